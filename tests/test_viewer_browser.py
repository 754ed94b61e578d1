"""nerfstudio's web viewer in a real (headless) Chromium: the Distillation panel of a live pds-edit
and of a live sds-nerfacto.

Starts a tiny `ns-train pds-edit` with the viewer on a free localhost port, checks that the panel
and its controls appear, types a new target prompt into the page, and waits until training reports
that prompt back in the panel ("Prompt in use" is set by each training step). Saves the screenshot
the README shows (docs/viewer_panel.png). The same for sds-nerfacto's prompt ("Last prompts").
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, FEW_SAMPLES, edit_flags, ns_train, offline_env

SCREENSHOT = Path(__file__).parents[1] / "docs" / "viewer_panel.png"
CHROMIUM_FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
    "--disable-component-update --disable-sync --window-size=1280,1400"
).split()
INPUT_OF = """
const label = Array.from(document.querySelectorAll('label')).find(l => l.innerText.trim() == arguments[0]);
return label ? label.closest('.mantine-Flex-root').querySelector('input') : null;
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, f"ns-train exited while waiting for {what}"
        value = condition()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def viewer_page(command: list[str], tmp_path: Path):
    """Start ``command`` (an ns-train with the viewer on a free port) and open its viewer in Chromium.

    Yields ``(driver, value, proc)``; ``value(label)`` is the current value of a panel control."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    port = free_port()
    command = [c if c != "tensorboard" else "viewer" for c in command]  # CPU_NERFACTO's --vis
    command += ["--viewer.websocket-port", str(port), "--viewer.websocket-host", "127.0.0.1"]
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen(
        [str(BIN / command[0]), *command[1:]], env=offline_env(tmp_path), stdout=log, stderr=log
    )
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"]:
        options.add_argument(flag)
    driver = None
    try:
        wait_for(lambda: port_open(port), 300, "the viewer's port", proc)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        driver.get(f"http://127.0.0.1:{port}")

        def value(label: str) -> str | None:
            element = driver.execute_script(INPUT_OF, label)
            return element.get_attribute("value") if element is not None else None

        body = wait_for(lambda: "Distillation" in driver.execute_script("return document.body.innerText"), 120,
                        "the Distillation panel", proc)  # fmt: skip
        assert body
        yield driver, value, proc
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def type_into(driver, label: str, text: str) -> None:
    """Replace the text of the panel's ``label`` box and press Enter, as a user would."""
    from selenium.webdriver.common.keys import Keys

    box = driver.execute_script(INPUT_OF, label)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(text, Keys.ENTER)


@pytest.mark.slow
def test_distillation_panel_in_chromium(tiny_scene, base_run, prior_folder, tmp_path):
    # FEW_SAMPLES: cheap training steps and viewer renders, which share the cores with Chromium
    flags = edit_flags(prior_folder, "--load-dir", str(base_run), *FEW_SAMPLES)
    command = ns_train("pds-edit", tmp_path / "out", tiny_scene, *flags, steps=100000)
    with viewer_page(command, tmp_path) as (driver, value, proc):
        for control in (
            "Target prompt",
            "CFG scale",
            "PDS psi scale",
            "PDS chi scale",
            "Current t",
            "Prompt in use",
        ):
            assert value(control) is not None, control
        wait_for(
            lambda: value("Prompt in use") == "a blue striped ball", 300, "the first training step", proc
        )

        new_prompt = "a red striped ball"  # the other prompt of the exact prior's set
        type_into(driver, "Target prompt", new_prompt)
        wait_for(lambda: value("Prompt in use") == new_prompt, 300, "training to use the new prompt", proc)
        assert value("Current t") not in (None, "-")

        panel = driver.execute_script(
            "return Array.from(document.querySelectorAll('*')).find(e => e.innerText == 'Distillation')",
        )
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", panel)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(SCREENSHOT))


@pytest.mark.slow
def test_text_to_3d_panel_in_chromium(tmp_path):
    """sds-nerfacto in the viewer: the panel's prompt, CFG and t range, and a prompt typed into the page
    reaches training (the view prompts of the last step echo it)."""
    from benchmarks.text_to_3d_quality import write_view_prior_set
    from nerfstudio_distill.data.scene import CameraSpec, SceneSpec
    from tests.test_text_to_3d import BLUE, FOV, RADIUS, RED, RES
    from tests.test_text_to_3d import ns_train as t2d_train

    cameras = CameraSpec(layout="hemisphere", num_views=40, radius=RADIUS, fov=FOV, width=RES, height=RES)
    spec = SceneSpec(colour="red", pattern="stripes", stripes=3)
    prior = write_view_prior_set(tmp_path / "prior", spec, cameras, {RED: {}, BLUE: {"colour": "blue"}})
    command = t2d_train("sds-nerfacto", tmp_path / "out", prior, steps=100000)
    with viewer_page(command, tmp_path) as (driver, value, proc):
        for control in ("Prompt", "CFG scale", "t min", "t max", "Current t", "Last prompts"):
            assert value(control) is not None, control
        wait_for(lambda: RED in (value("Last prompts") or ""), 300, "the first training step", proc)
        type_into(driver, "Prompt", BLUE)
        wait_for(lambda: BLUE in (value("Last prompts") or ""), 300, "training to use the new prompt", proc)
        assert all(p.startswith(BLUE + ", ") for p in value("Last prompts").split("; "))


@pytest.mark.slow
def test_splat_edit_panel_and_renders_in_chromium(tiny_scene, prior_folder, tmp_path):
    """A live pds-splatfacto in the viewer: the Distillation panel takes a new target prompt, and the viewer's
    renders of the splats (the plugin's torch rasteriser on CPU, with the "source_rgb" output) raise
    nothing in the training process."""
    from tests.conftest import ns_train_main, run_here
    from tests.test_edit_splatfacto import splat_edit_flags, splat_train

    run_here(ns_train_main, splat_train("splatfacto", tmp_path / "base", tiny_scene, steps=5))
    base = tmp_path / "base" / tiny_scene.name / "splatfacto" / "run" / "nerfstudio_models"
    command = splat_train(
        "pds-splatfacto", tmp_path / "out", tiny_scene, *splat_edit_flags(prior_folder, base), steps=100000
    )
    with viewer_page(command, tmp_path) as (driver, value, proc):
        wait_for(
            lambda: value("Prompt in use") == "a blue striped ball", 300, "the first training step", proc
        )
        type_into(driver, "Target prompt", "a red striped ball")
        wait_for(lambda: value("Prompt in use") == "a red striped ball", 300, "the new prompt in use", proc)
        canvas = driver.execute_script("return document.querySelectorAll('canvas').length")
        assert canvas > 0
        time.sleep(5)  # a few viewer renders of the splats
        assert proc.poll() is None
    log = (tmp_path / "train.log").read_text()
    assert "Traceback" not in log and "Error" not in log.replace("UserWarning", ""), log[-2000:]
