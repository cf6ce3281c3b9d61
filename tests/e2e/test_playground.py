"""The playground at / in a real browser (Debian's Chromium), against the real facade, Triton and
training worker: generate with a live progress bar, classify the prototype's examples, train a
LoRA from the page and see the served version change. Each pane's screenshot lands in build/e2e/
(the README's pictures in docs/ are these)."""

from __future__ import annotations

import base64
import json
import re

import pytest

import tests.conftest
from tests.e2e.conftest import PHONE, SCREENSHOTS
from tests.integration.test_training_api import TRIGGER, Stack, red_zip

pytestmark = pytest.mark.e2e

OPERATOR_KEY = getattr(tests.conftest, "TEST_API_KEY", "e2e-operator-key-0123456789")
"""What an operator types into the page: the key the test facades accept, where they require one."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    s = Stack(tmp_path_factory.mktemp("e2e-stack"))
    yield s
    s.close()


def shoot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def generate_in_page(page, prompt: str, seed: int, steps: int = 4) -> str:
    """Generate one 64x64 image from the Generate pane; returns the model version it shows."""
    page.get_by_role("tab", name="Generate").click()
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_label("Width").fill("64")
    page.get_by_label("Height").fill("64")
    page.get_by_label("Steps", exact=True).fill(str(steps))
    page.get_by_role("spinbutton", name="Seed").fill(str(seed))  # the download links are labelled "... seed N" too
    before = page.locator("#gen-results figure").count()
    # Record every value the bar takes, to see it move step by step and not jump to the end.
    # Old values from the mutation records: the observer runs once per task, so several events
    # handled in one task would otherwise show only the last value.
    page.evaluate("""() => { window.__progress = [];
        new MutationObserver((records) => { for (const r of records) window.__progress.push(Number(r.oldValue)); })
          .observe(document.getElementById('gen-progress'), {attributeFilter: ['value'], attributeOldValue: true}); }""")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_function(f"document.querySelectorAll('#gen-results figure').length > {before}", timeout=300_000)
    img = page.locator("#gen-results figure img").first
    img.wait_for()
    page.wait_for_function(
        "() => { const i = document.querySelector('#gen-results figure img'); return i.complete && i.naturalWidth > 0; }",
        timeout=30_000,
    )
    assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [64, 64]
    assert page.locator("#gen-progress").evaluate("p => p.value") == 100
    assert page.locator("#gen-percent").inner_text() == "100%"
    seen = page.evaluate("window.__progress")
    assert any(0 < v < 100 for v in seen), f"the bar never showed an intermediate step: {seen}"
    caption = page.locator("#gen-results figcaption").first.inner_text()
    assert f"seed {seed}" in caption
    download = page.locator("#gen-results figure a[download]").first
    assert download.get_attribute("download") == f"fluxserve-seed{seed}.png"
    return re.search(r"model version (\S+)", caption).group(1)


def test_generate_pane_shows_progress_and_a_decoded_image(stack, page) -> None:
    page.goto(stack.facade.url + "/")
    version = generate_in_page(page, "a red fox in snow", seed=7)
    assert version.isdigit()
    assert "Done" in page.locator("#gen-status").inner_text()
    shoot(page, "playground-generate")
    assert not [m for m in page.console_messages if m.startswith(("error", "pageerror"))], page.console_messages


@pytest.mark.parametrize(
    ("message", "label"),
    [
        ("make an image of you in Paris", "image_request"),
        ("can I see you in the kitchen?", "image_request"),
        ("see you tomorrow", "conversation"),
    ],
)
def test_classify_pane_prototype_examples(stack, page, message: str, label: str) -> None:
    page.goto(stack.facade.url + "/#classify")
    page.get_by_label("Chat message").fill(message)
    page.get_by_label("Chat message").press("Tab")  # keyboard: on to the Classify button
    page.keyboard.press("Enter")
    page.locator("#cls-label").filter(has_text=re.compile(r"\w")).wait_for(timeout=60_000)
    assert page.locator("#cls-label").inner_text() == label
    assert page.locator("#cls-uncertain").inner_text() == "no"
    image, conv = (float(page.locator(s).inner_text()) for s in ("#cls-score-image-text", "#cls-score-conv-text"))
    assert abs(image + conv - 1) < 0.01 and (image > conv) == (label == "image_request")
    if label == "image_request" and "kitchen" in message:
        shoot(page, "playground-classify")


def test_chat_from_the_classify_pane_generates(stack, page) -> None:
    page.goto(stack.facade.url + "/#classify")
    page.evaluate(
        "() => { for (const id of ['gen-width', 'gen-height']) document.getElementById(id).value = 64;"
        " document.getElementById('gen-steps').value = 2; }"
    )
    page.get_by_label("Chat message").fill("make an image of you in Paris")
    page.get_by_role("button", name="Send as chat message").click()
    page.wait_for_function(
        "() => { const i = document.querySelector('#chat-results img'); return i && i.complete && i.naturalWidth > 0; }",
        timeout=300_000,
    )
    assert page.locator("#chat-kind").inner_text() == "image"
    assert page.locator("#cls-status").inner_text().endswith("you in Paris")


@pytest.mark.timeout(2400)  # the publish step exports the transformer to ONNX: minutes on 2 busy cores
def test_train_pane_runs_a_job_and_the_new_version_serves(stack, page, tmp_path) -> None:
    page.goto(stack.facade.url + "/")
    before = int(generate_in_page(page, "zxq, a plain red square", seed=1, steps=2))
    page.get_by_role("tab", name="Train").click()
    page.get_by_label("Operator API key").fill(OPERATOR_KEY)
    page.get_by_role("button", name="Use key").click()
    assert page.evaluate("sessionStorage.getItem('fluxserve.apiKey')") == OPERATOR_KEY
    assert page.get_by_label("Operator API key").input_value() == ""  # not left in the field
    dataset = tmp_path / "red.zip"
    dataset.write_bytes(red_zip())
    page.get_by_label("Job", exact=True).select_option("flux_lora")
    page.get_by_label("Images (zip)").set_input_files(str(dataset))
    page.get_by_label("Trigger word").fill(TRIGGER)
    page.locator("#train-steps").fill("6")
    page.get_by_label("Resolution").fill("64")
    page.get_by_role("button", name="Start training").click()
    page.locator("#train-job").filter(has_text=re.compile(r"\w{6,}")).wait_for(timeout=60_000)
    page.locator("#train-state").filter(has_text="running").wait_for(timeout=300_000)
    shoot(page, "playground-train")
    page.locator("#train-version").filter(has_text=re.compile(r"^\d+$")).wait_for(timeout=2_000_000)
    after = int(page.locator("#train-version").inner_text())
    assert after > before
    assert page.locator("#train-state").inner_text() == "succeeded"
    assert page.locator("#train-progress").evaluate("p => p.value") == 100
    shoot(page, "playground-train-done")
    # The Generate pane now shows the new version on its images.
    assert int(generate_in_page(page, "zxq, a plain red square", seed=1, steps=2)) == after


def test_generate_pane_picks_an_adapter(stack, page) -> None:
    """The adapter picker (issue 27): filled from GET /loras once an operator key is set, and the
    chosen adapter and strength go into /generate, whose answer's adapter the caption shows. The
    answer is the page's own fixture: the model side of adapters is the integration tests'."""
    from common.adapter_store import adapters_dir
    from tests.unit.facade.test_http_loras import write_test_adapter
    from tests.unit.facade.test_http_train import png as png_bytes

    sha = write_test_adapter(adapters_dir(stack.repo), "e2e-dog", trigger_words="sks dog")
    page.goto(stack.facade.url + "/")
    assert "operator key" in page.locator("#gen-lora-hint").inner_text()
    page.get_by_role("tab", name="Train").click()
    page.get_by_label("Operator API key").fill(OPERATOR_KEY)
    page.get_by_role("button", name="Use key").click()
    page.get_by_role("tab", name="Generate").click()
    page.locator("#gen-lora option[value='e2e-dog']").wait_for(state="attached", timeout=30_000)
    assert page.locator("#gen-lora option").all_inner_texts() == ["none: the default model", "e2e-dog (sks dog)"]
    page.get_by_role("combobox", name="Adapter (a published LoRA)").select_option("e2e-dog")
    page.get_by_label("Adapter strength").fill("0.5")
    sent: list[dict] = []
    answer = {
        "images": [base64.b64encode(png_bytes(8)).decode()],
        "seed": 3,
        "model_version": "1",
        "prompt": "sks dog, a dog",
        "output_format": "png",
        "timings": {"inference_s": 0.1, "total_s": 0.1},
        "lora": {"name": "e2e-dog", "sha256": sha, "scale": 0.5},
    }

    def fulfil(route) -> None:
        sent.append(route.request.post_data_json)
        route.fulfill(
            status=200, content_type="text/event-stream", body=f"event: image\ndata: {json.dumps(answer)}\n\n"
        )

    page.route("**/generate", fulfil)
    page.get_by_label("Prompt").fill("a dog")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.locator("#gen-results figcaption").filter(has_text="adapter e2e-dog").wait_for(timeout=30_000)
    assert sent[0]["lora"] == "e2e-dog" and sent[0]["lora_scale"] == 0.5
    assert not [m for m in page.console_messages if m.startswith(("error", "pageerror"))], page.console_messages


def test_keyboard_and_layout(stack, page, browser) -> None:
    page.goto(stack.facade.url + "/")
    page.get_by_role("tab", name="Generate").focus()
    page.keyboard.press("ArrowRight")
    assert page.get_by_role("tab", name="Classify").get_attribute("aria-selected") == "true"
    assert page.locator("#pane-classify").is_visible() and not page.locator("#pane-generate").is_visible()
    page.keyboard.press("End")
    assert page.locator("#pane-train").is_visible()
    # Every form control has an accessible label.
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')).map(el => el.id)""")
    assert unlabeled == []
    # No horizontal scrolling at desktop or phone width, on any pane.
    for viewport in (None, PHONE):
        if viewport:
            page.set_viewport_size(viewport)
        for tab in ("Generate", "Classify", "Train"):
            page.get_by_role("tab", name=tab).click()
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{tab} pane scrolls sideways by {overflow}px at {viewport or 'desktop'}"
    page.get_by_role("tab", name="Generate").click()
    shoot(page, "playground-phone")


def test_page_is_self_contained(stack, page) -> None:
    """Nothing but this server: no CDN, no web fonts (and the CSP forbids them)."""
    origins: set[str] = set()
    page.on(
        "request", lambda r: origins.add(re.match(r"^[a-z]+://[^/]+", r.url).group(0) if "://" in r.url else r.url[:5])
    )
    response = page.goto(stack.facade.url + "/")
    page.wait_for_load_state("networkidle")
    assert origins == {stack.facade.url}, origins
    assert "default-src 'self'" in response.headers["content-security-policy"]
