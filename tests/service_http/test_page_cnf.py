"""The demo page on a CNF (in a real browser, as tests/service_http/test_page.py runs it): its ODE's steps and
prior scale are the controls, and Watch plays its solver steps from the prior to the samples."""

from pathlib import Path

import pytest
from conftest import CNF_STEPS, write_tiny_cnf
from page_driver import curl_body, expect, image_is_not_blank, open_page, wait_until_done, watch_the_result


@pytest.fixture
def cnf_page(browser, tmp_path: Path):
    directory = tmp_path / "models"
    directory.mkdir()
    write_tiny_cnf(directory / "flow.safetensors")
    with open_page(browser, directory, tmp_path / "state") as page:
        yield page


def test_a_cnf_takes_its_steps_and_temperature_and_watch_plays_its_solver_steps(cnf_page) -> None:
    page = cnf_page
    for control in ("#steps", "#temperature", "#ode-steps-hint", "#class-picker"):
        expect(page.locator(control)).to_be_visible()
    for control in ("#step_size", "#noise", "#steps-hint", "#pad", "input[name=init][value=noise]"):
        expect(page.locator(control)).to_be_hidden()
    assert page.input_value("#steps") == str(CNF_STEPS) and "midpoint ODE steps" in page.inner_text("#model-info")
    assert set(curl_body(page)) == {"model", "n", "format"}  # the checkpoint's defaults: nothing else to send

    page.fill("#steps", "6")
    page.select_option("#label", "3")
    watch_the_result(page)
    with page.expect_response("**/sample") as reply:
        page.click("#watch")
    sent = reply.value.request.post_data_json
    assert reply.value.status == 200 and sent["steps"] == 6 and sent["label"] == 3 and sent["stream"] is True
    wait_until_done(page)
    steps = page.evaluate("window.seenSteps.filter((text) => text.startsWith('step '))")
    assert steps[0] == "step 0 / 6" and steps[-1] == "step 6 / 6"
    assert page.evaluate("window.seenFrames.size") > 2  # the prior, the solver's states, the samples
    assert page.inner_text("#energy-now") == ""  # an ODE step evaluates no energy
    assert image_is_not_blank(page)
