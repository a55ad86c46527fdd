"""Chat prompt formatting with the model's own Jinja template (tokenizer.chat_template), rendered
in a sandbox as transformers and llama-cpp-python do. Models without a template get the built-in
format of their family (gemma: <start_of_turn>), else a plain one."""
from __future__ import annotations

from edgert.errors import EdgertError

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "{% if m['role'] == 'system' %}{{ '<start_of_turn>user\n' + m['content'] + '\n\n' }}"
    "{% else %}{% if not (loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'system') %}"
    "{{ '<start_of_turn>' + role + '\n' }}{% endif %}{{ m['content'] | trim }}{{ '<end_of_turn>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")


def template_for(tok, arch: str) -> str:
    if tok.chat_template:
        return tok.chat_template
    return GEMMA_TEMPLATE if arch.startswith("gemma") else PLAIN_TEMPLATE


def format_chat(template: str, messages: list[dict], tok, add_generation_prompt: bool = True) -> str:
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - jinja2 is a core dependency
        raise EdgertError("chat needs jinja2: pip install jinja2") from None

    def raise_exception(msg):
        raise EdgertError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    bos = tok.tokens[tok.bos_id] if tok.bos_id is not None else ""
    eos = tok.tokens[tok.eos_id] if tok.eos_id is not None else ""
    try:
        return env.from_string(template).render(messages=messages, bos_token=bos, eos_token=eos,
                                                add_generation_prompt=add_generation_prompt)
    except EdgertError:
        raise
    except Exception as e:
        raise EdgertError(f"chat template failed to render: {e}") from None


class Conversation:
    """A chat whose KV cache lives across turns, as llama-cli's: each turn renders the whole
    conversation with the template, keeps the cached tokens it shares with what is cached, and
    prefills only the rest (the new message and the template's framing). When the context cannot
    hold the conversation plus `reserve` reply tokens, the oldest turns are dropped down to half
    the context (the system message stays, as llama-cli's --keep -1) and the kept conversation is
    prefilled once, with a notice through on_notice. A reply stops at end of generation, its token limit, the end of the
    context (cut, with a notice) or when stop() says so (Ctrl-C): what was generated stays in
    the conversation."""

    def __init__(self, model, tok, template: str, params, system: str | None = None, reserve: int = 64):
        self.model, self.tok, self.template, self.params = model, tok, template, params
        self.system = system
        self.reserve = reserve
        self.messages: list[dict] = []
        self.cached: list[int] = []        # token ids in the KV cache, positions 0 .. len - 1
        self.last_prefill = 0              # tokens the last turn prefilled
        self.last_prompt_ms = 0.0
        self.clear()

    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.model.reset()
        self.cached = []

    def _render(self, messages) -> list[int]:
        return self.tok.encode(format_chat(self.template, messages, self.tok), add_special=False, special=True)

    def _fit(self, messages, on_notice) -> tuple[list, list[int]]:
        """When the rendered conversation leaves fewer than `reserve` tokens free, drop the oldest
        turns until it fills at most half the context (llama.cpp discards half too): the kept
        conversation is prefilled once, and the next turns again add only their own tokens."""
        ids = self._render(messages)
        n_ctx, dropped = self.model.n_ctx, 0
        first = 1 if messages and messages[0]["role"] == "system" else 0
        limit = n_ctx if len(ids) + self.reserve <= n_ctx else n_ctx // 2
        while len(ids) + self.reserve > limit and len(messages) - first > 1:
            k = first + (2 if len(messages) - first > 2 else 1)   # a user turn and its reply
            dropped += k - first
            messages = messages[:first] + messages[k:]
            ids = self._render(messages)
        if len(ids) + 1 > n_ctx:
            raise EdgertError(f"the message alone has {len(ids)} tokens with the template, more than the "
                              f"context of {n_ctx} (raise -c)")
        if dropped and on_notice:
            on_notice(f"context full: the oldest {dropped} messages were dropped "
                      f"({len(ids)} of {n_ctx} tokens kept)")
        return messages, ids

    def turn(self, text: str, n_predict: int, on_token=None, on_notice=None, stop=None):
        """Add the user's message, generate the reply; -> (reply text, Timings)."""
        from edgert.generate import generate
        self.messages, ids = self._fit(self.messages + [{"role": "user", "content": text}], on_notice)
        same = 0
        for a, b in zip(ids, self.cached):
            if a != b:
                break
            same += 1
        same = min(same, len(ids) - 1)          # at least one token to prefill: its logits start the reply
        kept = self.model.rewind(same)
        room = self.model.n_ctx - len(ids)
        is_eog = self.tok.is_eog

        def emit(t):
            if on_token and not is_eog(t):
                on_token(t)
        tm = generate(self.model, ids[kept:], room if n_predict < 0 else min(n_predict, room), self.params,
                      is_eog=lambda t: is_eog(t) or bool(stop and stop()), on_token=emit)
        reply = [t for t in tm.tokens if not is_eog(t)]
        # the KV cache holds the prompt and every sampled token but the last (never decoded)
        self.last_prefill, self.cached = len(ids) - kept, list(ids) + [int(t) for t in tm.tokens[:-1]]
        if len(reply) >= room and on_notice:
            on_notice(f"context full: the reply was cut at {len(reply)} tokens; the next message drops the "
                      "oldest turns")
        tm.tokens = reply
        answer = self.tok.decode(reply)
        self.messages.append({"role": "assistant", "content": answer})
        return answer, tm
