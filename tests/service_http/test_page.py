"""The demo page in a real browser (Debian's Chromium driven by Playwright) against a running server."""

import re
from pathlib import Path

import pytest
from conftest import write_gan_without_its_critic, write_tiny_ebm, write_tiny_eqm, write_tiny_flow, write_tiny_gan
from page_driver import curl_body, expect, image_is_not_blank, open_page, wait_until_done, watch_the_result
from server import running_server

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-output"


@pytest.fixture
def page(browser, models_dir: Path, tmp_path: Path):
    with open_page(browser, models_dir, tmp_path / "state") as page:
        yield page


def record_noise_frechet_distance(path: Path, distance: float) -> Path:
    """Store an `evaluate` figure for chains started from noise, as `evaluate --record` would."""
    from training.runtime.checkpoint import load_checkpoint, save_checkpoint

    checkpoint = load_checkpoint(path)
    checkpoint.config.metrics["evaluate_noise"] = {"frechet_distance": distance, "init": "noise"}
    save_checkpoint(path, checkpoint)
    return path


@pytest.fixture
def ranked_page(browser, tmp_path: Path):
    """Models with and without a noise FD: 'digits' (conditional, buffer-less, Gaussian prior) scores best
    among the EBMs; the GAN scores better still but is no energy; 'solo' has no figure at all."""
    directory = tmp_path / "models"
    directory.mkdir()
    write_tiny_ebm(directory / "solo.safetensors", seed=0)
    record_noise_frechet_distance(write_tiny_ebm(directory / "buffered.safetensors", seed=1), 42.0)
    record_noise_frechet_distance(write_tiny_eqm(directory / "digits.safetensors", seed=2), 12.0)
    record_noise_frechet_distance(write_tiny_gan(directory / "agan.safetensors", seed=3), 1.0)
    with open_page(browser, directory, tmp_path / "state") as page:
        yield page


@pytest.fixture
def gan_page(browser, tmp_path: Path):
    """A GAN that saved its critic ('refined': /models says latent_langevin), one that did not ('plain'), and
    an EBM ('solo'), on which the page opens."""
    directory = tmp_path / "models"
    directory.mkdir()
    write_tiny_ebm(directory / "solo.safetensors", seed=0)
    write_tiny_gan(directory / "refined.safetensors", seed=1)
    write_gan_without_its_critic(directory / "plain.safetensors")
    with open_page(browser, directory, tmp_path / "state") as page:
        yield page


def test_model_list_and_sample_show_a_grid(page) -> None:
    options = page.locator("#model option").all_inner_texts()
    assert any(text.startswith("pair (ebm, ensemble)") for text in options) and len(options) == 4
    page.select_option("#model", "solo")
    assert page.input_value("#steps") == "10"
    assert "validation CD loss -0.1" in page.inner_text("#model-info")
    assert '"model":"solo"' in page.inner_text("#curl")
    page.fill("#n", "9")
    page.click("#sample")
    page.wait_for_function("document.getElementById('step').textContent.startsWith('done')")
    assert image_is_not_blank(page)
    assert page.get_attribute("#download-png", "href").startswith("blob:")
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "demo-page-sample.png"), full_page=True)


def test_watch_plays_the_stream_with_a_step_counter_and_energy_curve(page) -> None:
    page.select_option("#model", "pair")
    page.fill("#steps", "400")
    page.check("input[name=init][value=noise]")
    watch_the_result(page)
    page.click("#watch")
    page.wait_for_function("document.getElementById('step').textContent.startsWith('done')", timeout=60000)
    steps = page.evaluate("window.seenSteps.filter((text) => text.startsWith('step '))")
    assert len(set(steps)) >= 10 and steps[-1] == "step 400 / 400"
    assert page.evaluate("window.seenFrames.size") >= 10
    assert page.inner_text("#energy-now").startswith("E = ")
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "demo-page-watch.png"), full_page=True)


def test_drawing_a_digit_and_completing_it(page) -> None:
    page.select_option("#model", "solo")
    box = page.locator("#pad").bounding_box()
    page.mouse.move(box["x"] + 98, box["y"] + 30)
    page.mouse.down()
    page.mouse.move(box["x"] + 98, box["y"] + 170, steps=10)
    page.mouse.up()
    assert page.is_checked("input[name=init][value=image]")
    page.select_option("#mask", "bottom")
    assert '"init":"image"' in page.inner_text("#curl") and '"mask":"<base64 PNG>"' in page.inner_text("#curl")
    with page.expect_response("**/sample") as reply:
        page.click("#sample")
    assert reply.value.status == 200
    sent = reply.value.request.post_data_json
    assert sent["init"] == "image" and sent["image"].startswith("data:image/png;base64,") and "mask" in sent
    page.wait_for_function("document.getElementById('step').textContent.startsWith('done')")
    assert image_is_not_blank(page)


def test_server_errors_are_shown_to_the_user(page) -> None:
    page.fill("#n", "1000")
    page.click("#sample")
    page.wait_for_selector("#error:not([hidden])")
    assert "422" in page.inner_text("#error") and "at most 64" in page.inner_text("#error")
    expected = [line for line in page.console_problems if "status of 422" in line]
    assert len(expected) == 1  # the browser's own log line for the failed fetch; nothing else
    page.console_problems.remove(expected[0])


def test_the_page_fits_a_phone(browser, models_dir: Path, tmp_path: Path) -> None:
    settings = Settings(models_dir=models_dir, state_dir=tmp_path / "state", device="cpu")
    with running_server(settings) as (base, _):
        context = browser.new_context(viewport={"width": 380, "height": 800}, is_mobile=True, has_touch=True)
        phone = context.new_page()
        phone.goto(base)
        phone.wait_for_function("document.querySelectorAll('#model option').length > 0")
        assert phone.evaluate("document.documentElement.scrollWidth") <= 380
        phone.screenshot(path=str(SCREENSHOTS / "demo-page-phone.png"), full_page=True)
        context.close()


def test_the_page_opens_on_the_energy_with_the_best_noise_frechet_distance(ranked_page) -> None:
    page = ranked_page
    assert (
        page.input_value("#model") == "digits"
    )  # FD 12 beats 'buffered' (42), the first EBM; the GAN's 1.0 is no EBM's
    assert page.is_checked("input[name=init][value=noise]")  # its sampler starts from noise
    assert page.inner_text("#noise-name") == "Gaussian noise"
    assert "FD 12 (samples from noise)" in page.inner_text("#model-info") and "?" not in page.inner_text("#model-info")
    page.select_option("#model", "buffered")  # a CD model whose checkpoint starts chains from its buffer
    assert page.is_checked("input[name=init][value=buffer]") and page.is_enabled("input[name=init][value=buffer]")
    assert page.inner_text("#noise-name") == "uniform noise"
    page.select_option("#model", "digits")  # changing back re-applies that model's defaults
    assert page.is_checked("input[name=init][value=noise]")


def test_the_replay_buffer_cannot_be_chosen_for_a_model_trained_without_one(ranked_page) -> None:
    page = ranked_page
    page.select_option("#model", "digits")
    assert page.is_disabled("input[name=init][value=buffer]")
    assert '"init":"noise"' in page.inner_text("#curl")
    page.select_option("#model", "solo")
    assert page.is_enabled("input[name=init][value=buffer]")


def test_a_class_picker_for_a_conditional_energy_only(ranked_page) -> None:
    page = ranked_page
    page.select_option("#model", "digits")
    expect(page.locator("#class-picker")).to_be_visible()
    assert page.locator("#label option").all_inner_texts() == ["any", *[str(digit) for digit in range(10)]]
    assert "label" not in curl_body(page)  # "any" sends no label
    page.select_option("#label", label="3")
    assert curl_body(page)["label"] == 3

    with page.expect_response("**/sample") as reply:
        page.click("#watch")
    assert reply.value.status == 200 and reply.value.request.post_data_json["label"] == 3
    wait_until_done(page)
    assert image_is_not_blank(page)
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "demo-page-watch-class.png"), full_page=True)

    with page.expect_response("**/sample") as reply:
        page.click("#sample")
    assert reply.value.status == 200 and reply.value.request.post_data_json["label"] == 3
    wait_until_done(page)
    assert image_is_not_blank(page)

    page.select_option("#model", "solo")
    expect(page.locator("#class-picker")).to_be_hidden()
    assert "label" not in curl_body(page)
    with page.expect_response("**/sample") as reply:
        page.click("#sample")
    assert reply.value.status == 200 and "label" not in reply.value.request.post_data_json


def test_sample_after_watch_does_not_show_the_watchs_energy(page) -> None:
    page.select_option("#model", "solo")
    page.check("input[name=init][value=noise]")
    page.click("#watch")
    wait_until_done(page)
    watched = page.inner_text("#energy-now")
    assert watched.startswith("E = ")
    with page.expect_response("**/sample"):
        page.click("#sample")
    wait_until_done(page)
    assert page.inner_text("#energy-now") != watched
    curve_is_blank = page.evaluate("""() => {
        const canvas = document.getElementById('curve');
        const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        return pixels.every((value) => value === 0);
    }""")
    assert curve_is_blank


def test_a_label_the_model_refuses_is_shown_to_the_user(ranked_page) -> None:
    page = ranked_page
    page.select_option("#model", "digits")
    page.evaluate("() => { document.querySelector('#label').add(new Option('ten', '10')); }")
    page.select_option("#label", "10")  # as if the page held a stale class list
    page.click("#sample")
    expect(page.locator("#error")).to_contain_text("out of range")
    assert "0..9" in page.inner_text("#error")
    expected = [line for line in page.console_problems if "status of 422" in line]
    assert len(expected) == 1
    page.console_problems.remove(expected[0])


def test_a_gan_with_its_critic_takes_ddls_steps_and_watch_streams_the_refinement(gan_page) -> None:
    page = gan_page
    page.select_option("#model", "refined")
    for control in ("#steps", "#step_size", "#noise", "#temperature"):
        expect(page.locator(control)).to_be_visible()
    assert page.input_value("#steps") == "0"  # the checkpoint's sampler.steps: a plain pass unless asked
    expect(page.locator("#steps-hint")).to_contain_text("0: one plain generator pass")
    assert (page.input_value("#step_size"), page.input_value("#noise")) == ("0.01", "0.1")  # its sampler's
    expect(page.locator("input[name=init][value=noise]")).to_be_hidden()  # no images to start from
    expect(page.locator("#pad")).to_be_hidden()
    assert "DDLS" in page.inner_text("#model-info")
    assert "steps" not in curl_body(page) and "init" not in curl_body(page)

    page.fill("#steps", "12")
    assert curl_body(page)["steps"] == 12
    watch_the_result(page)
    with page.expect_response("**/sample") as reply:
        page.click("#watch")
    sent = reply.value.request.post_data_json
    assert reply.value.status == 200 and sent["steps"] == 12 and sent["stream"] is True and "init" not in sent
    wait_until_done(page)
    steps = page.evaluate("window.seenSteps.filter((text) => text.startsWith('step '))")
    assert steps[0] == "step 0 / 12" and steps[-1] == "step 12 / 12"
    assert page.evaluate("window.seenFrames.size") > 1  # G(z) along the chain, then the samples
    assert re.fullmatch(r"E\(z\) = -?\d+\.\d{4}", page.inner_text("#energy-now"))
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "demo-page-watch-ddls.png"), full_page=True)

    page.fill("#steps", "0")  # the plain pass: its one frame, and no energy to show
    assert curl_body(page).get("steps") is None  # 0 is this checkpoint's default: nothing to send
    watch_the_result(page)
    page.click("#watch")
    wait_until_done(page)
    assert page.inner_text("#energy-now") == ""
    assert page.evaluate("window.seenSteps.filter((text) => text.startsWith('step '))") == ["step 1 / 1"]


def test_a_gan_without_its_critic_and_an_ebm_keep_their_own_controls(gan_page) -> None:
    page = gan_page
    page.select_option("#model", "plain")
    for control in ("#steps", "#step_size", "#noise", "#temperature", "#pad"):
        expect(page.locator(control)).to_be_hidden()
    assert "DDLS" not in page.inner_text("#model-info")
    assert set(curl_body(page)) == {"model", "n", "format"}
    with page.expect_response("**/sample") as reply:
        page.click("#sample")
    assert reply.value.status == 200 and set(reply.value.request.post_data_json) == {"model", "n", "format"}
    wait_until_done(page)

    page.select_option("#model", "solo")  # back on an EBM: its Langevin controls, its lower bound on steps
    expect(page.locator("#steps")).to_be_visible()
    expect(page.locator("#steps-hint")).to_be_hidden()
    expect(page.locator("input[name=init][value=noise]")).to_be_visible()
    assert page.get_attribute("#steps", "min") == "1" and page.input_value("#steps") == "10"


SHIPPED_FIGURES = {  # metrics as the shipped checkpoints carry them (evaluate --record and the trainers)
    "eqm": {  # eqm_mnist
        "evaluate_noise": {"coverage_bits": 3.32, "floor_frechet_distance": 5.504, "frechet_distance": 8.84,
                           "guidance": 1.25, "init": "noise", "label_accuracy": 0.979, "max_chain_steps": 60,
                           "mean_steps": 23.6, "n": 2000, "noise": 0.0, "p95_steps": 25, "precision": 0.841,
                           "recall": 0.835, "step_size": 0.015, "steps": 60, "tolerance": 0.006},
        "evaluate_noise_label_all": {"floor_frechet_distance": 5.504, "frechet_distance": 13.398, "guidance": 1.5,
                                     "init": "noise", "label": "all", "label_accuracy": 0.986, "n": 2000,
                                     "noise": 0.0, "precision": 0.827, "recall": 0.817, "steps": 60},
        "evaluate_noise_noise_0.01": {"floor_frechet_distance": 28.025, "frechet_distance": 79.961,
                                      "guidance": 1.25, "init": "noise", "label_accuracy": 0.8867, "n": 300,
                                      "noise": 0.01, "precision": 0.75, "recall": 0.817, "steps": 360},
        "val_eqm": 2.262897,
    },
    "solo": {  # ebm_mnist_seed0
        "evaluate_buffer": {"floor_frechet_distance": 5.504, "frechet_distance": 100.269, "init": "buffer",
                            "n": 2000, "precision": 0.584, "recall": 0.653, "steps": 60},
        "val_cd": -3.77646, "val_e_noise": 3.81533, "val_e_test": 0.03887,
    },
    "gan": {  # dcgan_mnist
        "critic_loss": 0.26287,
        "evaluate": {"floor_frechet_distance": 5.504, "frechet_distance": 32.455, "n": 2000, "noise": 0.0775,
                     "precision": 0.608, "recall": 0.824, "step_size": 0.003, "steps": 50},
        "evaluate_steps_0": {"floor_frechet_distance": 5.504, "frechet_distance": 38.751, "n": 2000,
                             "precision": 0.556, "recall": 0.853, "steps": 0},
        "generator_loss": 4.17107,
    },
    "nice": {  # nice_mnist
        "evaluate": {"floor_frechet_distance": 5.504, "frechet_distance": 588.545, "n": 2000, "precision": 0.878,
                     "recall": 0.022, "test_bits_per_dim": 4.4145},
        "test_bits_per_dim": 4.4145,
    },
    "cnf": {  # as evaluate records a CNF's, with its test likelihood
        "evaluate": {"floor_frechet_distance": 5.504, "frechet_distance": 20.5, "guidance": 1.5, "n": 2000,
                     "precision": 0.8, "recall": 0.8, "solver": "midpoint", "steps": 20, "temperature": 1.0,
                     "test_bits_per_dim": 1.2345, "likelihood": {"standard_error": 0.0123, "n": 200}},
        "val_flow_matching": 0.51234,
    },
}  # fmt: skip
IN_WORDS = {  # what the model line says of those figures
    "eqm": [
        "FD 8.84, precision 0.841, recall 0.835, label accuracy 97.9 % (2000 samples from noise, at most 60 steps "
        "of 0.015 (mean 23.6), stopped at an RMS move of 0.006, guidance 1.25; real images: FD 5.5)",
        "FD 13.4, precision 0.827, recall 0.817, label accuracy 98.6 % (2000 samples from noise, each class in "
        "turn, 60 steps, guidance 1.5; real images: FD 5.5)",
        "FD 80, precision 0.75, recall 0.817, label accuracy 88.7 % (300 samples from noise, 360 steps, noise 0.01, "
        "guidance 1.25; real images: FD 28)",
        "validation EqM loss 2.263",
    ],
    "solo": [
        "FD 100, precision 0.584, recall 0.653 (2000 samples from the replay buffer, 60 steps; real images: FD 5.5)",
        "validation CD loss -3.776",
        "validation energy of noise 3.815",
        "validation energy of test images 0.03887",
    ],
    "pair": ["ensemble: FD 50 (samples from the replay buffer, 10 steps)"],
    "gan": [
        "critic loss 0.2629 (last epoch)",
        "FD 32.5, precision 0.608, recall 0.824 (2000 samples, 50 DDLS steps, noise 0.0775; real images: FD 5.5)",
        "FD 38.8, precision 0.556, recall 0.853 (2000 samples, one generator pass; real images: FD 5.5)",
        "generator loss 4.171 (last epoch)",
    ],
    "nice": [
        "FD 589, precision 0.878, recall 0.022, test 4.41 bits/dim (2000 samples; real images: FD 5.5)",
        "test 4.415 bits/dim",
    ],
    "cnf": [
        "FD 20.5, precision 0.8, recall 0.8, test 1.23 ± 0.0123 bits/dim (2000 samples, 20 midpoint steps, "
        "guidance 1.5, temperature 1; real images: FD 5.5)",
        "validation flow-matching loss 0.5123",
    ],
}


def record_figures(path: Path, metrics: dict) -> None:
    from training.runtime.checkpoint import load_checkpoint, save_checkpoint

    checkpoint = load_checkpoint(path)
    checkpoint.config.metrics = metrics
    save_checkpoint(path, checkpoint)


@pytest.fixture
def figures_page(browser, models_dir: Path, tmp_path: Path):
    """models_dir's EBMs ('solo', the ensemble 'pair') and a model of each other family, with shipped figures."""
    from conftest import write_tiny_cnf

    write_tiny_eqm(models_dir / "eqm.safetensors")
    write_tiny_gan(models_dir / "gan.safetensors")
    write_tiny_flow(models_dir / "nice.safetensors")
    write_tiny_cnf(models_dir / "cnf.safetensors")
    for name, metrics in SHIPPED_FIGURES.items():
        record_figures(models_dir / f"{name}.safetensors", metrics)
    with open_page(browser, models_dir, tmp_path / "state") as page:
        yield page


def test_the_model_line_gives_each_figure_in_words_not_its_key(figures_page) -> None:
    page = figures_page
    for name, lines in IN_WORDS.items():
        page.select_option("#model", name)
        info = page.inner_text("#model-info")
        shown = info.splitlines()[1:]  # under the family line, one figure a line
        assert shown == lines, f"{name}: {info}"
        assert "_" not in info and "evaluate" not in info and "frechet" not in info, info


def test_the_page_says_it_serves_every_family() -> None:
    html = (Path(__file__).resolve().parents[2] / "service" / "http" / "static" / "index.html").read_text()
    subtitle = re.search(r"<header>.*?<p>(.*?)</p>", html, flags=re.S)
    assert subtitle is not None
    for family in ("energy-based models", "normalizing flows", "GANs"):
        assert family in subtitle.group(1), family


def with_energy_reference(path: Path, reference: float) -> Path:
    """A checkpoint given a recorded OOD reference of 64 held-out energies all equal to `reference`: every image
    scores above it (p = 0) when it is far below, and below it (p = 1) when it is far above."""
    from training.runtime.checkpoint import load_checkpoint, save_checkpoint

    checkpoint = load_checkpoint(path)
    checkpoint.config.metrics["ood"] = {"score": "energy", "reference": [reference] * 64, "split": "test", "n": 64}
    save_checkpoint(path, checkpoint)
    return path


@pytest.fixture
def score_page(browser, tmp_path: Path):
    directory = tmp_path / "models"
    directory.mkdir()
    with_energy_reference(write_tiny_ebm(directory / "strict.safetensors", seed=0), -1e6)
    with_energy_reference(write_tiny_ebm(directory / "lenient.safetensors", seed=1), 1e6)
    write_tiny_flow(directory / "flow.safetensors", arch_name="nice")
    write_tiny_gan(directory / "gan.safetensors")
    with open_page(browser, directory, tmp_path / "state") as page:
        yield page


def test_the_score_pad_scores_a_drawing_with_every_model_and_says_the_p_value_in_words(score_page) -> None:
    page = score_page
    expect(page.locator("#scores")).to_be_hidden()
    box = page.locator("#score-pad").bounding_box()
    page.mouse.move(box["x"] + 98, box["y"] + 30)
    page.mouse.down()
    page.mouse.move(box["x"] + 98, box["y"] + 170, steps=10)
    page.mouse.up()
    page.click("#score")
    rows = page.locator("#scores tbody tr")
    expect(rows).to_have_count(4)
    expect(page.locator("#scores tbody td", has_text="scoring…")).to_have_count(0, timeout=30000)
    table = {
        row.get_attribute("data-model"): [cell.inner_text() for cell in row.locator("td").all()] for row in rows.all()
    }
    strict, lenient, flow, gan = table["strict"], table["lenient"], table["flow"], table["gan"]
    assert strict[1].startswith("energy ") and strict[2].startswith("unusual for this model: none of its own")
    assert "(p = 0)" in strict[2] and page.locator("#scores tr[data-model=strict] td.unusual").count() == 1
    assert lenient[1].startswith("energy ") and lenient[2].startswith("typical of its data: 100 % of its own")
    assert "bits/dim" in flow[1] and flow[2] == "no reference scores recorded: no verdict"
    assert gan[1].startswith("critic ") and gan[2] == "no reference scores recorded: no verdict"
    SCREENSHOTS.mkdir(exist_ok=True)
    page.locator(".scoring").screenshot(path=str(SCREENSHOTS / "demo-page-score.png"))
