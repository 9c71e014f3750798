"""Image folders (the torchvision ImageFolder layout) trained by every family through the real CLI, and the
colour models they make served as RGB pictures through real HTTP."""

from __future__ import annotations

import base64
import contextlib
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from server import running_server

from service.settings import Settings
from training.commands.cli import main
from training.train.data import DatasetError, load_dataset

COLOURS = {"cats": (220, 60, 30), "dogs": (30, 90, 220)}  # two classes, each one hue with some texture
ODD_FILES = ("cmyk.jpg", "palette.png", "deep.png", "broken.png")


def write_picture(path: Path, colour: tuple[int, int, int], rng: np.random.Generator, size=(40, 36)) -> None:
    shade = 0.6 + 0.4 * rng.random((size[1], size[0], 1))  # [H, W, 1]
    Image.fromarray((np.array(colour) * shade).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pets/{train,test}/{cats,dogs}/ with two non-square colour PNGs each, and in train the files a real
    folder collects: a CMYK JPEG, a palette PNG, a 16-bit grey PNG, a corrupt PNG and a stray text file."""
    root = tmp_path_factory.mktemp("pets")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for index in range(2):
                write_picture(root / split / name / f"{index}.png", colour, rng)
    train = root / "train"
    Image.new("RGB", (24, 24), COLOURS["cats"]).convert("CMYK").save(train / "cats" / "cmyk.jpg")
    Image.new("RGB", (24, 24), COLOURS["dogs"]).convert("P", palette=Image.Palette.ADAPTIVE).save(
        train / "dogs" / "palette.png"
    )
    Image.fromarray((np.arange(30 * 30).reshape(30, 30) * 70).astype(np.uint16)).save(train / "dogs" / "deep.png")
    (train / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not the rest of a PNG")
    (train / "README.txt").write_text("collected by hand")
    return root


def test_a_mixed_colour_folder_loads_with_one_warning_per_odd_file(colour_folder: Path, capsys) -> None:
    train = load_dataset("folder", colour_folder, "train")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert train.shape == (3, 32, 32) and train.classes == ["cats", "dogs"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]  # cats: 2 + CMYK (the corrupt one skipped); dogs: 2 + 2
    assert float(train.images.min()) >= -1.0 and float(train.images.max()) <= 1.0
    for name in (*ODD_FILES, "README.txt"):
        assert sum(name in line for line in warnings) == 1, (name, warnings)
    assert any("broken.png: skipped, not a readable image" in line for line in warnings)
    assert any("cmyk.jpg: CMYK converted to RGB" in line for line in warnings)
    assert any("deep.png: 16-bit image scaled to 8 bits" in line for line in warnings)
    test = load_dataset("folder", colour_folder, "test", image_size=20)
    assert test.shape == (3, 20, 20) and test.labels.tolist() == [0, 0, 1, 1]


def test_a_grey_folder_of_28_pixel_images_keeps_mnist_shape(tmp_path: Path, capsys) -> None:
    for split in ("train", "test"):
        for digit in ("0", "1"):
            (tmp_path / split / digit).mkdir(parents=True)
            Image.new("L", (28, 28), 40 + 100 * int(digit)).save(tmp_path / split / digit / "a.png")
    Image.new("RGB", (28, 28), (250, 0, 0)).save(tmp_path / "test" / "1" / "red.png")
    assert load_dataset("folder", tmp_path, "train").shape == (1, 28, 28)
    test = load_dataset("folder", tmp_path, "test")
    assert test.shape == (1, 28, 28) and len(test.labels) == 3
    assert "red.png: colour image made grey" in capsys.readouterr().err
    assert load_dataset("folder", tmp_path, "train", image_size=16).shape == (1, 16, 16)


def test_layout_mistakes_are_one_line_errors_naming_the_folder(tmp_path: Path, capsys) -> None:
    with pytest.raises(DatasetError, match="has no train/ folder"):
        load_dataset("folder", tmp_path, "train")
    (tmp_path / "train" / "cats").mkdir(parents=True)
    (tmp_path / "test" / "horses").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "cats" / "a.png")
    with pytest.raises(DatasetError, match="horses is not a class of"):
        load_dataset("folder", tmp_path, "test")
    with pytest.raises(SystemExit) as exit_info:
        main(["gan", "--dataset", "folder", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "g")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "nope" in error and "Traceback" not in error


ONE_BATCH = ["--dataset", "folder", "--epochs", "1", "--batch-size", "4", "--max-batches", "1"]
FAMILIES = {  # checkpoint name -> the smallest real training command of each family and objective
    "cd_ebm": ["ebm", "--width", "4", "--steps", "2", "--sample-steps", "3", "--buffer-capacity", "16"],
    "eqm_ebm": ["ebm", "--objective", "eqm", "--conditional", "--width", "4", "--sample-steps", "3"],
    "dcgan": ["gan", "--width", "4", "--latent-dim", "4"],
    "nice": ["flow", "--arch", "nice", "--hidden", "8", "--couplings", "2", "--depth", "1"],
    "glow": ["flow", "--arch", "glow", "--hidden", "8", "--levels", "2", "--steps", "1"],
    "iresnet": ["flow", "--arch", "iresnet", "--hidden", "8", "--blocks", "1"],
}


@pytest.fixture(scope="module")
def trained(colour_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory with one checkpoint per family, each trained for one batch on the colour folder."""
    models = tmp_path_factory.mktemp("models")
    runs = tmp_path_factory.mktemp("runs")
    for name, command in FAMILIES.items():
        out = ["--out", str(models / f"{name}.safetensors"), "--run-dir", str(runs / name)]
        with contextlib.redirect_stderr(io.StringIO()):  # the folder's warnings, once per command
            main([*command, *ONE_BATCH, "--data-dir", str(colour_folder), *out])
    return models


def test_every_family_trains_on_the_folder_as_3x32x32(trained: Path) -> None:
    from training.runtime.checkpoint import load_checkpoint

    for name in FAMILIES:
        checkpoint = load_checkpoint(trained / f"{name}.safetensors")
        assert checkpoint.config.data["shape"] == [3, 32, 32], name
        assert checkpoint.config.data["dataset"] == "folder"
    eqm = load_checkpoint(trained / "eqm_ebm.safetensors").config
    assert eqm.data["classes"] == ["cats", "dogs"] and eqm.arch["kwargs"]["num_classes"] == 2


def test_the_dcgan_generator_refuses_a_side_that_is_not_a_multiple_of_4(
    colour_folder: Path, tmp_path: Path, capsys
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*FAMILIES["dcgan"], *ONE_BATCH, "--data-dir", str(colour_folder), "--image-size", "30"])
    assert exit_info.value.code == 2
    assert "multiple of 4 (28, 32, 64, ...), not 30" in capsys.readouterr().err


def test_evaluate_says_it_has_no_figures_for_a_colour_model(trained: Path) -> None:
    with pytest.raises(SystemExit, match="reads 1x28x28 images; cd_ebm makes 3x32x32 images"):
        main(["evaluate", str(trained / "cd_ebm.safetensors")])


def decode(payload: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(payload))
    image.load()
    return image


def colourful(image: Image.Image) -> bool:
    rgb = np.asarray(image.convert("RGB")).astype(int)
    return bool((rgb != rgb[:, :, :1]).any())


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def test_colour_models_are_served_as_rgb_pictures(trained: Path, tmp_path: Path) -> None:
    settings = Settings(models_dir=trained, state_dir=tmp_path / "state", device="cpu")
    with running_server(settings) as (base, _):
        listed = {model["name"]: model for model in httpx.get(f"{base}/models").json()}
        assert set(listed) == set(FAMILIES) and all(model["shape"] == [3, 32, 32] for model in listed.values())
        assert listed["eqm_ebm"]["classes"] == ["cats", "dogs"]
        for name in FAMILIES:
            one = httpx.post(f"{base}/sample", json={"model": name, "seed": 1}, timeout=60)
            assert one.status_code == 200 and one.headers["content-type"] == "image/png", name
            picture = decode(one.content)
            assert picture.mode == "RGB" and picture.size == (32, 32) and colourful(picture), name
        grid = decode(httpx.post(f"{base}/sample", json={"model": "cd_ebm", "n": 4, "seed": 2}, timeout=60).content)
        assert grid.mode == "RGB" and grid.size == (2 * (32 + 2) + 2,) * 2
        gif = decode(httpx.post(f"{base}/sample", json={"model": "cd_ebm", "n": 2, "format": "gif"}).content)
        assert getattr(gif, "n_frames", 1) > 1 and colourful(gif)
        body = httpx.post(f"{base}/sample", json={"model": "eqm_ebm", "format": "json", "trajectory_every": 1}).json()
        frames = [decode(base64.b64decode(frame[0])) for frame in body["trajectory"]]
        assert all(frame.mode == "RGB" and frame.size == (32, 32) for frame in frames)
        # A colour start image, its lower half to complete: the upper half stays the picture that was sent.
        start = Image.new("RGB", (32, 32), COLOURS["dogs"])
        mask = Image.new("RGB", (32, 32), (0, 0, 0))
        mask.paste((255, 255, 255), (0, 16, 32, 32))
        completed = httpx.post(
            f"{base}/sample",
            json={"model": "eqm_ebm", "init": "image", "image": png_data_url(start), "mask": png_data_url(mask)},
        )
        assert completed.status_code == 200, completed.text
        top = np.asarray(decode(completed.content))[:16].reshape(-1, 3)
        assert decode(completed.content).mode == "RGB" and (np.abs(top - np.array(COLOURS["dogs"])) <= 1).all()


def test_the_page_draws_in_colour_for_a_colour_model(trained: Path, tmp_path: Path) -> None:
    """The demo page in Chromium: a colour model offers a pen colour, sends a coloured drawing and shows the
    RGB picture it gets back."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    settings = Settings(models_dir=trained, state_dir=tmp_path / "state", device="cpu")
    with running_server(settings) as (base, _), sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(chromium), headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(base)
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
        page.select_option("#model", "cd_ebm")
        assert page.is_visible("#pen-picker")
        page.fill("#pen", "#20c040")
        box = page.locator("#pad").bounding_box()
        page.mouse.move(box["x"] + 30, box["y"] + 98)
        page.mouse.down()
        page.mouse.move(box["x"] + 170, box["y"] + 98, steps=5)
        page.mouse.up()
        page.fill("#steps", "2")
        page.fill("#n", "1")
        with page.expect_response("**/sample") as reply:
            page.click("#sample")
        sent = reply.value.request.post_data_json["image"].partition(",")[2]
        drawing = np.asarray(decode(base64.b64decode(sent)).convert("RGB")).reshape(-1, 3)
        assert (drawing[:, 1] > 2 * drawing[:, 0] + 40).any()  # green strokes went out
        assert reply.value.status == 200
        page.wait_for_function("document.getElementById('result').naturalWidth === 32")
        shown = page.evaluate(
            "async () => Array.from(new Uint8Array(await (await fetch(document.getElementById('result').src))"
            ".arrayBuffer()))"
        )
        assert decode(bytes(shown)).mode == "RGB"  # the PNG the page shows, as the server sent it
        browser.close()
