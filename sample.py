"""Talk to a trained model: plain completion, a terminal chat, or a Gradio chat in the browser.

Completion (streamed to stdout; the default checkpoint is the newest SFT run under out/, else the
newest pretraining run):
    python sample.py --prompt "Once upon a time" --max_new_tokens 200 --temperature 0.8 --top_k 50
    python sample.py --ckpt out/demo --prompt "The" --num_samples 3 --seed 0
Terminal chat (multi-turn, through the model's own chat template, the one SFT renders with: kiln's,
or a Hugging Face folder's; /reset clears it, /exit quits):
    python sample.py --ckpt out/sft --chat --system "You are a helpful assistant."
Browser chat (listens on 127.0.0.1 only; --host 0.0.0.0 opens it to the network, --share makes a
public link):
    python sample.py --gradio --port 7860
Faster tokens after a one-time compile (torch.compile of the one-token decode step; any mode):
    python sample.py --gradio --compile
Exported Hugging Face directories work everywhere a kiln checkpoint does:
    python sample.py --ckpt out/hf/demo --chat
Options are --key value or --key=value; --help lists them all.
"""
import sys
from dataclasses import dataclass

import torch

import checkpoint
import common
import config
import generate


def generate_ids(model, prompt_ids, max_new_tokens, temperature=0.8, top_k=None, top_p=None,
                 seed=None, stop_ids=()):
    """Token ids (ints) continuing prompt_ids, one per step, from generate.generate with its KV
    cache; stops before a stop id. Clamps max_new_tokens to the room left in the context. top_k 0
    and top_p 1 mean off."""
    room = model.config.max_seq_len - len(prompt_ids)
    if room < 1:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens but the model's context is "
                         f"{model.config.max_seq_len}; use a shorter prompt")
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)                 # (1, T)
    steps = generate.generate(model, idx, min(max_new_tokens, room), temperature=temperature,
                              top_k=top_k or None, top_p=top_p if top_p and top_p < 1 else None,
                              seed=seed, stop_ids=stop_ids)
    while True:
        # inference_mode skips autograd's bookkeeping on every op (~10% faster decode on CPU than
        # no_grad). Entered per step, not around the loop: Gradio may resume this generator on
        # another thread.
        with torch.inference_mode():
            tok = next(steps, None)
        if tok is None or int(tok[0]) in stop_ids:
            return
        yield int(tok[0])


def stream_text(model, tokenizer, prompt_ids, max_new_tokens=256, temperature=0.8, top_k=None,
                top_p=None, seed=None):
    """Generate a continuation of prompt_ids and yield it as text, piece by piece.

    Stops at the end of a reply (tokenizer.stop_ids: kiln's <|end|>, the chat template's
    end-of-turn marker, eos) or at a BOS (the start of another document). The pieces joined are
    exactly tokenizer.decode(generated ids): we decode the whole list each step and yield the new
    suffix, holding it back while it ends in U+FFFD, i.e. while a multi-byte UTF-8 character is
    split across tokens.
    """
    ids = []
    shown = ""
    stops = tuple(i for i in (*tokenizer.stop_ids, tokenizer.bos_id) if i is not None)
    for tok in generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                            stop_ids=stops):
        ids.append(tok)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown):]
        shown = text
    text = tokenizer.decode(ids)
    if len(text) > len(shown):  # a generation that ended mid-character: show what there is
        yield text[len(shown):]


def fit_history(tokenizer, messages, max_tokens):
    """Render a conversation (ending in a user turn) as a generation prompt of at most max_tokens
    tokens.

    Drops the oldest turns first, a whole user+assistant pair at a time, and always keeps a leading
    system message and the last user turn. Returns (prompt ids, the messages kept).
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = list(messages[len(system):])
    while True:
        ids = tokenizer.render_prompt(system + turns)
        if len(ids) <= max_tokens:
            return ids, system + turns
        if len(turns) <= 1:
            raise ValueError(f"the last message needs {len(ids)} prompt tokens but only "
                             f"{max_tokens} fit beside the reply; send a shorter message or lower "
                             "max_new_tokens")
        turns = turns[2 if turns[1]["role"] == "assistant" else 1:]


def complete(model, tokenizer, args):
    prompt_ids = tokenizer.encode(args.prompt)
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i  # distinct but reproducible samples
        print(args.prompt, end="", flush=True)
        for piece in stream_text(model, tokenizer, prompt_ids, args.max_new_tokens,
                                 args.temperature, args.top_k, args.top_p, seed):
            print(piece, end="", flush=True)
        print("\n" + "-" * 40 if i < args.num_samples - 1 else "")


def chat_terminal(model, tokenizer, args):
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    budget = model.config.max_seq_len - args.max_new_tokens
    print("chat: /reset starts over, /exit quits, Ctrl-C stops a reply", file=sys.stderr)
    while True:
        try:
            user = input("\nyou> ")
        except EOFError:
            break
        if user.strip() == "/exit":
            break
        if user.strip() == "/reset":
            messages = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        try:
            asked = messages + [{"role": "user", "content": user}]
            ids, kept = fit_history(tokenizer, asked, budget)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        if len(kept) < len(messages) + 1:
            print(f"(dropped the {len(messages) + 1 - len(kept)} oldest messages to fit the "
                  f"{model.config.max_seq_len}-token context)", file=sys.stderr)
        print("bot> ", end="", flush=True)
        reply = ""
        try:
            # Reproducible, but not the same seed each turn.
            seed = None if args.seed is None else args.seed + len(kept)
            for piece in stream_text(model, tokenizer, ids, args.max_new_tokens, args.temperature,
                                     args.top_k, args.top_p, seed):
                reply += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            pass
        print()
        messages = kept + [{"role": "assistant", "content": reply}]


def message_text(content):
    """Gradio hands history content over as a str (API calls) or a list of {"type": "text", ...}
    parts."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def build_app(model, tokenizer, system="", max_new_tokens=256, temperature=0.8, top_k=50,
              top_p=0.95, prompt_log=None):
    """A Gradio ChatInterface; every prompt it builds is appended to prompt_log (a list) when one
    is given."""
    import gradio as gr
    context = model.config.max_seq_len

    def respond(message, history, system, temperature, top_k, top_p, max_new_tokens):
        messages = [{"role": "system", "content": system}] if system.strip() else []
        messages += [{"role": m["role"], "content": message_text(m["content"])} for m in history]
        messages.append({"role": "user", "content": message})
        try:
            ids, kept = fit_history(tokenizer, messages, context - int(max_new_tokens))
        except ValueError as e:
            raise gr.Error(str(e)) from None
        if len(kept) < len(messages):
            gr.Info(f"The conversation is longer than the {context}-token context: the model "
                    f"no longer sees the {len(messages) - len(kept)} oldest messages.")
        if prompt_log is not None:
            prompt_log.append(ids)
        reply = ""
        for piece in stream_text(model, tokenizer, ids, int(max_new_tokens), temperature,
                                 int(top_k), top_p):
            reply += piece
            yield reply

    return gr.ChatInterface(
        respond, title="kiln chat", api_name="chat", analytics_enabled=False,
        additional_inputs=[
            gr.Textbox(system, label="System prompt", lines=2),
            gr.Slider(0.0, 2.0, temperature, step=0.05, label="Temperature (0 = greedy)"),
            gr.Slider(0, 200, top_k, step=1, label="Top-k (0 = off)"),
            gr.Slider(0.05, 1.0, top_p, step=0.05, label="Top-p (1 = off)"),
            gr.Slider(1, context // 2, min(max_new_tokens, context // 2), step=1,
                      label="Max new tokens"),
        ],
        additional_inputs_accordion=gr.Accordion("Settings", open=True),
    )


@dataclass
class Args:
    ckpt: str | None = None       # checkpoint dir, run dir or exported HF dir (default: newest)
    prompt: str | None = None     # text to continue (plain completion)
    chat: bool = False            # terminal chat
    gradio: bool = False          # browser chat
    system: str = ""              # system prompt for --chat / --gradio
    max_new_tokens: int = 256
    temperature: float = 0.8      # 0 = greedy
    top_k: int = 50               # 0 = off
    top_p: float = 0.95           # 1 = off
    seed: int | None = None
    num_samples: int = 1
    device: str = "auto"
    compile: bool = False         # compile the decode step: ~10-60 s once, then ~1.3x faster on CPU
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False           # make a public gradio.live link


def main(argv=None):
    args = config.parse_args(Args(), argv, doc=__doc__)
    if (args.prompt is not None) + args.chat + args.gradio != 1:
        raise ValueError("give exactly one of --prompt TEXT, --chat or --gradio")
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise ValueError("--max_new_tokens and --num_samples must be at least 1")
    path = checkpoint.find_checkpoint(args.ckpt)
    model, tokenizer, _ = checkpoint.load_model(path, device=common.pick_device(args.device))
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer.json; export it again with export_hf.py or "
                         "pass a kiln checkpoint")
    print(f"loaded {path} ({model.num_params():,} parameters)", file=sys.stderr)
    if args.compile:
        # Compile now, on a two-token warm-up, so that the first reply does not stall (Gradio
        # would time it out).
        print("compiling the decode step (once; torch caches it on disk for the next start)...",
              file=sys.stderr)
        generate.compile_decode(model)
        for _ in generate_ids(model, [0], 2, temperature=0):
            pass
    if args.prompt is not None:
        complete(model, tokenizer, args)
    elif args.chat:
        chat_terminal(model, tokenizer, args)
    else:
        app = build_app(model, tokenizer, args.system, args.max_new_tokens, args.temperature,
                        args.top_k, args.top_p)
        app.queue().launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    common.cli(main)
