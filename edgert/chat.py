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
