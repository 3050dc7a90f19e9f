"""An incremental JSON recogniser: how much of a text can still become one JSON value,
and what closes it.

Tool-call arguments stream to clients as the model writes them, and a client that
concatenates the pieces must get JSON that parses, even when the model stops early or
writes something invalid. So text is passed on only while it is a valid prefix, a
trailing comma is held back until what follows it arrives, and at the end `closing()`
gives the characters that complete the value (closing quotes and brackets, `null` for a
missing value).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_WHITESPACE = frozenset(" \t\r\n")
_HEX = frozenset("0123456789abcdefABCDEF")


class JsonPrefix:
    def __init__(self) -> None:
        self._stack: list[str] = []  # "{" or "["
        # What may come next: value | value_or_end | key | key_or_end | colon | comma
        self._expect = "value"
        self._string: str | None = None  # "key" or "value" while inside a string
        self._escape = 0  # 1: after a backslash; 2..5: hex digits of \u still to read
        self._literal = ""  # what is left to read of true/false/null
        self._number = ""
        self.done = False  # one whole value has been read
        self.invalid = False  # a character could not continue the value
        self.accepted = 0  # characters accepted so far
        self.safe = 0  # characters that can be passed on (a trailing comma is held back)

    def feed(self, text: str) -> int:
        """Accepts what it can of `text`; returns how many characters it accepted."""
        taken = 0
        for char in text:
            if self.invalid or not self._step(char):
                if not self.done:
                    self.invalid = True
                break
            taken += 1
            self.accepted += 1
            if self._expect not in ("key", "value") or not self._after_comma():
                self.safe = self.accepted
        return taken

    def _after_comma(self) -> bool:
        return (
            self._string is None
            and not self._literal
            and not self._number
            and (
                (self._expect == "key" and self._stack[-1:] == ["{"])
                or (self._expect == "value" and self._stack[-1:] == ["["])
            )
        )

    def _step(self, char: str) -> bool:
        if self._string is not None:
            return self._string_char(char)
        if self._literal:
            if char != self._literal[0]:
                return False
            self._literal = self._literal[1:]
            if not self._literal:
                self._value_done()
            return True
        if self._number:
            if char in _NUMBER_CHARS:
                # Only while the text can still become a number ("00" never can).
                grown = self._number + char
                if _NUMBER.fullmatch(grown) is None and _NUMBER.fullmatch(grown + "0") is None:
                    return False
                self._number = grown
                return True
            if _NUMBER.fullmatch(self._number) is None:
                return False
            self._number = ""
            self._value_done()
        if char in _WHITESPACE:
            return True
        if self.done:
            return False
        return self._structural(char)

    def _string_char(self, char: str) -> bool:
        if self._escape == 1:
            if char == "u":
                self._escape = 5
                return True
            self._escape = 0
            return char in '"\\/bfnrt'
        if self._escape > 1:
            self._escape = self._escape - 1 if char in _HEX else -1
            if self._escape == 1:
                self._escape = 0
            return self._escape >= 0
        if char == "\\":
            self._escape = 1
        elif char == '"':
            kind, self._string = self._string, None
            if kind == "key":
                self._expect = "colon"
            else:
                self._value_done()
        elif ord(char) < 0x20:
            return False
        return True

    def _structural(self, char: str) -> bool:
        expect = self._expect
        if expect in ("value", "value_or_end"):
            if char == "]" and expect == "value_or_end":
                return self._close("[")
            return self._start_value(char)
        if expect in ("key", "key_or_end"):
            if char == "}" and expect == "key_or_end":
                return self._close("{")
            if char != '"':
                return False
            self._string = "key"
            return True
        if expect == "colon":
            if char != ":":
                return False
            self._expect = "value"
            return True
        # expect == "comma": a comma or the end of the open container
        if char == ",":
            self._expect = "key" if self._stack[-1] == "{" else "value"
            return True
        if char in "}]":
            return self._close("{" if char == "}" else "[")
        return False

    def _start_value(self, char: str) -> bool:
        if char in "{[":
            self._stack.append(char)
            self._expect = "key_or_end" if char == "{" else "value_or_end"
        elif char == '"':
            self._string = "value"
        elif char in _LITERALS:
            self._literal = _LITERALS[char][1:]
        elif char == "-" or char.isdigit():
            self._number = char
        else:
            return False
        return True

    def _close(self, opener: str) -> bool:
        if not self._stack or self._stack[-1] != opener:
            return False
        self._stack.pop()
        self._value_done()
        return True

    def _value_done(self) -> None:
        if self._stack:
            self._expect = "comma"
        else:
            self.done = True

    def closing(self) -> str:
        """What completes the safe prefix into one JSON value ("" once done)."""
        if self.done and not self._number:
            return ""
        suffix = ""
        expect = self._expect
        if self._string is not None:
            if self._escape == 1:
                suffix += "\\"
            elif self._escape > 1:
                suffix += "0" * (self._escape - 1)
            suffix += '"'
            expect = "colon" if self._string == "key" else "comma"
        elif self._literal:
            suffix += self._literal
            expect = "comma"
        elif self._number:
            if _NUMBER.fullmatch(self._number) is None:
                suffix += "0"
            expect = "comma"
        if expect == "colon":
            suffix += ":null"
        elif expect == "value" and not self._after_comma():
            suffix += "null"
        for opener in reversed(self._stack):
            suffix += "}" if opener == "{" else "]"
        return suffix
