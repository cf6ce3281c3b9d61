"""The FLUX prompt for a chat message that asked for an image: the request phrasing removed.

"make an image of you in Paris" asks for *you in Paris*; sending the request words themselves
to FLUX only adds noise ("make", "image"). The rule is deliberately narrow, so it never
changes what the user asked to see:

1. Only a request phrase at the very start of the message is removed, one of
   - an imperative: `[please] make|create|generate|draw|paint|render|send|show|give [me|us]`
   - a question: `can|could|would|will you [please] <one of the verbs above> [me|us]`
   - a wish: `can|could|may I|we [please] see|get|have`, `I want|I'd like|I would like [to see]`
   followed, optionally, by a medium and its preposition (`a picture of`, `an image showing`,
   `some photos with`). A medium without a preposition stays ("send me a selfie" → "a selfie").
2. Then trailing `?`/`!`/`.` and a trailing `please` are dropped.
3. If nothing matched at the start, or what is left has no letters, the message is sent as it
   is (trimmed): the classifier already said it is an image request, and a prompt that is the
   whole message is always safe.
"""

from __future__ import annotations

import re

_VERBS = r"(?:make|create|generate|draw|paint|render|produce|send|show|give)"
_MEDIUM = (
    r"(?:(?:an?|the|some|another|one\s+more|more)\s+)?(?:(?:new|quick|nice|little|real)\s+)?"
    r"(?:image|picture|pic|photo|photograph|snapshot|snap|drawing|painting|render|illustration)s?"
    r"\s+(?:of|showing|with)\s+"
)
_LEADS = (
    rf"(?:please\s+)?{_VERBS}\s+(?:(?:me|us)\b\s*)?",
    rf"(?:can|could|would|will)\s+(?:you|u)\s+(?:please\s+)?{_VERBS}\s+(?:(?:me|us)\b\s*)?",
    r"(?:can|could|may)\s+(?:i|we)\s+(?:please\s+)?(?:see|get|have)\s+",
    r"i\s*(?:want|would\s+like|'d\s+like|wanna)\s+(?:to\s+see\s+)?",
)
_REQUEST = re.compile(rf"^\s*(?:{'|'.join(_LEADS)})(?:{_MEDIUM})?", re.IGNORECASE)
_PLEASE = re.compile("please", re.IGNORECASE)


def _without_tail(text: str) -> str:
    """`text` without a trailing `[\\s?!.]*`, and a `[\\s,]+please` just before it: what
    `re.sub(r"(?:[\\s,]+please)?[\\s?!.]*$", "", text, flags=re.I)` leaves, in one pass from the end.
    That regex is quadratic in a whitespace run that does not end the text (it is retried from
    every position of the run), on the event loop (docs/benchmarks.md, "Measurements behind smaller
    choices")."""
    end = len(text)
    while end and (text[end - 1].isspace() or text[end - 1] in "?!."):
        end -= 1
    word = end - len("please")
    if word > 0 and _PLEASE.fullmatch(text, word, end):
        start = word
        while start and (text[start - 1].isspace() or text[start - 1] == ","):
            start -= 1
        if start < word:
            end = start
    return text[:end]


def image_prompt(message: str) -> str:
    """The prompt to send to FLUX for `message` (see the module docstring for the rule)."""
    original = message.strip()
    match = _REQUEST.match(original)
    if match is None:
        return original
    rest = _without_tail(original[match.end() :]).strip()
    if not re.search(r"[^\W\d_]", rest):
        return original
    return rest
