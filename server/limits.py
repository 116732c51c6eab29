"""Input limits: one typed table of byte/length caps, checked before any tokenization or storage.

`InputLimits` is built once from flags (server.main) and passed down to every servicer and
converter. Each check appends (field path, description) pairs, so a request with several bad
fields is told about all of them in one INVALID_ARGUMENT; descriptions never echo the value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Visible ASCII, no spaces: safe to echo in a gRPC header and in logs.
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")
Violations = list[tuple[str, str]]


@dataclass(slots=True, frozen=True)
class InputLimits:
    max_prompt_bytes: int = 1 << 20  # prompt text, or tokenized text (Tokenize), in UTF-8 bytes
    max_token_ids: int = 1 << 18  # token ids in one prompt or Detokenize call
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256  # each stop string
    max_stop_token_ids: int = 64
    max_request_id_length: int = 128  # also the x-request-id header
    max_job_id_length: int = 64
    max_idempotency_key_bytes: int = 256
    max_webhook_url_bytes: int = 2048

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    # -- checks: each appends violations to `bad` and returns whether the value passed --------

    def check_text(self, bad: Violations, field: str, text: str) -> bool:
        # UTF-8 is at most 4 bytes a character: only count exactly when it might matter.
        if len(text) * 4 > self.max_prompt_bytes and len(text.encode("utf-8", "surrogatepass")) > self.max_prompt_bytes:
            bad.append((field, f"at most {self.max_prompt_bytes} bytes of text"))
            return False
        return True

    def check_token_ids(self, bad: Violations, field: str, count: int) -> bool:
        if count > self.max_token_ids:
            bad.append((field, f"at most {self.max_token_ids} token ids, got {count}"))
            return False
        return True

    def check_stop(self, bad: Violations, field: str, stops: list[str], token_ids: list[int]) -> bool:
        ok = True
        if len(stops) > self.max_stop_strings:
            bad.append((f"{field}.stop", f"at most {self.max_stop_strings} stop strings, got {len(stops)}"))
            ok = False
        for i, stop in enumerate(stops[:self.max_stop_strings]):
            if len(stop.encode("utf-8", "surrogatepass")) > self.max_stop_string_bytes:
                bad.append((f"{field}.stop[{i}]", f"at most {self.max_stop_string_bytes} bytes"))
                ok = False
        if len(token_ids) > self.max_stop_token_ids:
            bad.append((f"{field}.stop_token_ids",
                        f"at most {self.max_stop_token_ids} stop token ids, got {len(token_ids)}"))
            ok = False
        return ok

    def check_request_id(self, bad: Violations, field: str, value: str) -> bool:
        return _check_token(bad, field, value, self.max_request_id_length)

    def check_job_id(self, bad: Violations, field: str, value: str) -> bool:
        return _check_token(bad, field, value, self.max_job_id_length)

    def check_bytes(self, bad: Violations, field: str, value: str, limit: int) -> bool:
        if len(value) * 4 > limit and len(value.encode("utf-8", "surrogatepass")) > limit:
            bad.append((field, f"at most {limit} bytes"))
            return False
        return True


def _check_token(bad: Violations, field: str, value: str, limit: int) -> bool:
    if not value:
        bad.append((field, "must not be empty"))
        return False
    if len(value) > limit:
        bad.append((field, f"at most {limit} characters, got {len(value)}"))
        return False
    if not _TOKEN_CHARS.fullmatch(value):
        bad.append((field, "only visible ASCII characters (0x21-0x7e) are allowed"))
        return False
    return True
