"""Chat templates: a conversation rendered by a model's own Jinja template exactly as transformers'
apply_chat_template renders it, plus where each message's content lies in the text.

    text, spans = render(template, messages, add_generation_prompt=True, bos_token="<s>")

Knowing where content lies is what lets bpe.Tokenizer encode a user's "<|im_start|>" as plain text
(never a forged turn) and learn exactly the assistant turns in SFT. The template is rendered twice:
once with each content swapped for a sentinel (so the sentinels show where content goes, and the
rest is the template's own text) and once as it is, the check that the template copies content
unchanged (trimming its ends, as Llama 3's `| trim` does, is followed). A template that rewrites
content in other ways (e.g. splits out a <think> block) is refused with a clear error.
"""
import datetime
import functools
import json
import re

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Added around each sentinel: whitespace (str.strip removes it, so a trimming template drops it)
# that no template writes itself, so it tells whether the content's own edge whitespace survived.
EDGE = "\u3000"


class _Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}, transformers' marker of the tokens to learn: renders
    its body unchanged (kiln finds the assistant turns itself, in every template)."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: plain json.dumps (Jinja's own escapes HTML characters)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def compile_template(source):
    """The template compiled in the environment transformers uses: sandboxed, trim_blocks and
    lstrip_blocks, loop controls, raise_exception, strftime_now and its tojson."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not parse (line {e.lineno}: {e.message}); fix "
                         "chat_template in tokenizer_config.json") from None


def _run(template, messages, add_generation_prompt, variables):
    try:
        # tools and documents as None, as transformers passes them: templates test `is not none`
        return compile_template(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
            documents=None, **variables)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template refused this conversation: {e}") from None


def _edges(s):
    """(leading whitespace, the rest stripped, trailing whitespace) of s."""
    core = s.strip()
    lead = s[:len(s) - len(s.lstrip())]
    return lead, core, s[len(lead) + len(core):]


def render(template, messages, add_generation_prompt=False, **variables):
    """(text, spans): the conversation as the Jinja template renders it, and spans = [(start, end,
    message index)], in text order, one per place where a message's content was written (a
    template may drop a message or write one twice). variables: bos_token, eos_token, ..."""
    contents = [m["content"] for m in messages]
    # a sentinel character that no content holds (private use plane 15)
    mark = next(c for c in map(chr, range(0xF0000, 0xF0400)) if not any(c in s for s in contents))
    stand_ins = []
    for i, m in enumerate(messages):
        lead, _, trail = _edges(m["content"])
        stand_ins.append({**m, "content": f"{lead}{EDGE}{mark}{i}{mark}{EDGE}{trail}"})
    parts = re.split(f"{mark}(\\d+){mark}", _run(template, stand_ins, add_generation_prompt,
                                                 variables))
    # parts: [template text, index, template text, index, ..., template text]
    text = ""
    spans = []
    for k in range(0, len(parts), 2):
        piece = parts[k]
        if k > 0:  # the content before this piece: its trailing whitespace, if the template kept it
            _, _, trail = _edges(contents[int(parts[k - 1])])
            if piece.startswith(EDGE + trail):
                piece = piece[len(EDGE + trail):]
                text += trail
                spans[-1] = (spans[-1][0], len(text), spans[-1][2])
        if k + 1 == len(parts):
            text += piece
            break
        i = int(parts[k + 1])  # the content after this piece: its leading whitespace, if kept
        lead, core, _ = _edges(contents[i])
        kept = piece.endswith(lead + EDGE)
        text += piece[:-len(lead + EDGE)] if kept else piece
        start = len(text)
        text += (lead if kept else "") + core
        spans.append((start, len(text), i))
    if text != _run(template, messages, add_generation_prompt, variables):
        raise ValueError("the chat template changes message content beyond trimming its ends, so "
                         "kiln cannot tell content from template text; give content as the "
                         "template expects it or use a template that copies content as it is")
    return text, spans
