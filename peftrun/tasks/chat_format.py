"""Chat formats: the message layouts a record may use (messages, ShareGPT; field and role names
configurable), the chat template a conversation is rendered with (the tokenizer's, a ChatML-like
default, or task.chat_template), and the rendering of a request's conversation up to the reply.
Used by task=chat (training data) and peftrun-generate (requests) alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from peftrun.errors import ConfigError

ROLES = ("system", "user", "assistant")
# Role names understood without task.roles: the messages layout's and ShareGPT's.
ROLE_NAMES = {"system": "system", "user": "user", "assistant": "assistant",
              "human": "user", "gpt": "assistant", "model": "assistant"}
MESSAGES_FIELDS = ("messages", "conversations")  # tried in this order when not configured
ROLE_FIELDS = ("role", "from")
CONTENT_FIELDS = ("content", "value")

# For tokenizers without a chat template: ChatML, each turn closed by the tokenizer's EOS token
# (<|im_end|> for a ChatML tokenizer), so the model learns to stop after a reply.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class BadRecord(Exception):
    """A record that is not a trainable conversation; the message says why and how to fix it."""


def kind_of_value(value: Any) -> str:
    return {dict: "an object", list: "a list", type(None): "null", bool: "a boolean",
            int: "a number", float: "a number", str: "a string"}.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------- templates
def _is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


def template_path(value: str | None) -> Path | None:
    """The file a task.chat_template value names (absolute), None for template text or null."""
    if not value or _is_template(value):
        return None
    return Path(value).expanduser().absolute()


def resolve_template(value: str | None, tokenizer) -> str:
    """The Jinja template to render with: task.chat_template (the text, or a file), else the
    tokenizer's own, else ChatML closed by the EOS token."""
    if value:
        if _is_template(value):
            return value
        path = template_path(value)
        if not path.is_file():
            raise ConfigError("task.chat_template", f"{value!r} is neither a Jinja template (it has no "
                                                    f"{{{{ or {{%) nor a file; give the template "
                                                    f"text or a path to a file holding it")
        return path.read_text(encoding="utf-8")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, Mapping):  # several named templates
        own = own.get("default")
    if own:
        return own
    if tokenizer.eos_token is None:
        raise ConfigError("task.chat_template", "the tokenizer has neither a chat template nor an EOS "
                                                "token to close turns with; give one with "
                                                "task.chat_template")
    return DEFAULT_TEMPLATE


def render(tokenizer, template: str, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """The template's text for `messages`; a syntax error is a ConfigError, any other failure a
    BadRecord (the template refused this conversation)."""
    from jinja2 import TemplateSyntaxError

    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateSyntaxError as e:
        raise ConfigError("task.chat_template", f"the chat template does not parse (line {e.lineno} "
                                                f"of the template: {e.message}); fix its Jinja "
                                                f"syntax") from None
    except Exception as e:  # raise_exception() in the template, a missing key, ...
        reason = " ".join(str(e).split())[:200]
        raise BadRecord(f"fails to render with the chat template ({type(e).__name__}: {reason}); "
                        f"fix the record or give a template that renders it with "
                        f"task.chat_template") from None
    if not isinstance(text, str):
        raise ConfigError("task.chat_template", f"rendering gave {kind_of_value(text)}, not text; give a "
                                                f"template with task.chat_template")
    return text


def chat_prompt(task_cfg: Mapping, tokenizer, text: str) -> str:
    """A request to a chat run (peftrun-generate): `text` as one user message, rendered up to
    the assistant's reply with the run's template, as the run's test prompts were."""
    template = resolve_template(task_cfg.get("chat_template"), tokenizer)
    try:
        return render(tokenizer, template, [{"role": "user", "content": text}], True)
    except BadRecord as e:
        raise ConfigError("task.chat_template", f"a prompt {e}") from None


def messages_field(task_cfg: Mapping, record: Mapping) -> str | None:
    """The field of `record` that holds its conversation, as the run read its data
    (task.messages_field, else "messages" or "conversations"); None where it has none."""
    wanted = task_cfg.get("messages_field")
    field = wanted or next((f for f in MESSAGES_FIELDS if f in record), None)
    return field if field in record else None


def request_messages(task_cfg: Mapping, record: Mapping) -> list[dict[str, str]]:
    """A request to a chat run given as a conversation (a line {"messages": [...]} of
    `peftrun-generate`'s prompts file), read as the run read its data (its field names and
    roles). BadRecord (it says why and how to fix it) for anything else, or for a conversation
    that ends with an assistant message (there is nothing to answer)."""
    field = messages_field(task_cfg, record)
    if field is None:
        name = task_cfg.get("messages_field") or "messages"
        raise BadRecord(f'has neither "prompt" nor "{name}"; write {{"prompt": "..."}} or '
                        f'{{"{name}": [{{"role": "user", "content": "..."}}]}}')
    roles = dict(ROLE_NAMES)
    for name, role in dict(task_cfg.get("roles") or {}).items():
        if role in ROLES:
            roles[str(name)] = role
    messages = read_messages(record[field], field, task_cfg.get("role_field"), task_cfg.get("content_field"), roles)
    if messages[-1]["role"] == "assistant":
        raise BadRecord("ends with an assistant message, so there is nothing to answer; end the "
                        "conversation with the message to answer (a user turn)")
    return messages


def chat_request(task_cfg: Mapping, tokenizer, record: Mapping) -> str:
    """`request_messages(task_cfg, record)` rendered up to the assistant's reply with the run's
    template, as the run's test prompts were."""
    messages = request_messages(task_cfg, record)
    template = resolve_template(task_cfg.get("chat_template"), tokenizer)
    try:
        return render(tokenizer, template, messages, True)
    except BadRecord as e:
        raise BadRecord(str(e).replace("fix the record or give", "fix the request or give")) from None


def read_messages(messages: Any, field: str, role_field: str | None, content_field: str | None,
                  roles: Mapping[str, str]) -> list[dict[str, str]]:
    """A record's list of messages as {"role", "content"}, its roles mapped through `roles`;
    BadRecord for anything that is not a non-empty list of messages with a role and a text."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRecord(f'has "{field}" {"empty" if isinstance(messages, (list, tuple)) else kind_of_value(messages)}, '
                        f'not a list of messages; write a non-empty list of {{"role", "content"}} objects')
    out = []
    for n, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping):
            raise BadRecord(f"has message {n} as {kind_of_value(message)}, not an object with a role and "
                            f"a content")
        role_key = role_field or next((f for f in ROLE_FIELDS if f in message), None)
        content_key = content_field or next((f for f in CONTENT_FIELDS if f in message), None)
        if role_key not in message:
            wanted = f'"{role_field}"' if role_field else '"role" (or "from")'
            raise BadRecord(f"has message {n} without a {wanted} field (fields there: "
                            f"{', '.join(map(str, message)) or 'none'}); name it with task.role_field")
        role = message[role_key]
        mapped = roles.get(role) if isinstance(role, str) else None
        if mapped is None:
            example = role if isinstance(role, str) and role.isidentifier() else "NAME"
            raise BadRecord(f"has message {n} with role {role!r}, not system, user or assistant "
                            f"(nor human, gpt, model); map it, e.g. 'task.roles={{{example}: user}}'")
        if content_key not in message:
            wanted = f'"{content_field}"' if content_field else '"content" (or "value")'
            raise BadRecord(f"has message {n} without a {wanted} field (fields there: "
                            f"{', '.join(map(str, message)) or 'none'}); name it with task.content_field")
        content = message[content_key]
        if not isinstance(content, str):
            raise BadRecord(f'has message {n} whose "{content_key}" is {kind_of_value(content)}, not a '
                            f"string; write the message's text as a string")
        out.append({"role": mapped, "content": content})
    return out
