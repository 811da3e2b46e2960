"""The Gradio chat in a real headless Chromium: load the page, send a message, watch the reply
stream in.

Needs Debian's chromium at /usr/bin/chromium (.ci/run installs it); skips without it, and fails on
CI. Saves a screenshot to tests/artifacts/chat.png.
"""
import time
from pathlib import Path

import torch

import checkpoint
from conftest import skip_or_fail_on_ci
import generate
import sample
from test_sample import free_port, make_tiny_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def test_chat_streams_in_browser(tmp_path, monkeypatch):
    if not CHROMIUM.exists():
        skip_or_fail_on_ci("headless test needs /usr/bin/chromium (apt-get install chromium)")
    import playwright.sync_api as playwright   # a pinned test dependency: never skipped
    model, tokenizer, _ = checkpoint.load_model(make_tiny_checkpoint(tmp_path, train_steps=30))
    real_generate = generate.generate

    def slow_generate(model, idx, max_new_tokens, **kw):
        # A tiny model is instant and may stop at once: slow it and drop the stop ids so the
        # browser has a reply of max_new_tokens tokens to watch grow.
        for tok in real_generate(model, idx, max_new_tokens, **{**kw, "stop_ids": ()}):
            time.sleep(0.05)
            yield tok

    message = "Hello, who are you?"
    prompt = torch.tensor([tokenizer.render_prompt([{"role": "user", "content": message}])])
    reply = torch.cat(list(real_generate(model, prompt, 40, temperature=0)))          # (40,)
    expected = tokenizer.decode(reply.tolist())
    monkeypatch.setattr(generate, "generate", slow_generate)
    app = sample.build_app(model, tokenizer, max_new_tokens=40, temperature=0.0)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                       quiet=True)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.goto(f"http://127.0.0.1:{port}/")
            box = page.get_by_placeholder("Type a message...")
            box.fill(message)
            box.press("Enter")
            bot = page.locator('[data-testid="bot"]')  # the assistant's message bubbles
            texts = []
            deadline = time.time() + 60
            while time.time() < deadline and (not texts or squash(texts[-1]) != squash(expected)):
                if bot.count():
                    texts.append(bot.last.inner_text())
                time.sleep(0.05)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "chat.png"))
            user_text = page.locator('[data-testid="user"]').last.inner_text()
            browser.close()
    finally:
        app.close()
    assert message in user_text
    assert texts and squash(texts[-1]) == squash(expected)  # the whole greedy reply arrived
    partial = sorted({squash(t) for t in texts} - {squash(expected)}, key=len)
    assert len(partial) >= 2, f"the reply did not stream: the page showed only {texts}"
    assert all(squash(expected).startswith(t) for t in partial)  # each view: a prefix of the reply


def squash(text):
    """The page collapses runs of white space; compare texts the same way."""
    return " ".join(text.split())
