"""How text is generated, shared by ``generate``, ``chat`` and ``predict``: greedy or sampled (temperature, top-p,
top-k, a seed), stop strings (the answer ends before the first one), and a streamer that prints as tokens come
but never prints a stop string or the start of one."""

from __future__ import annotations

from dataclasses import dataclass, field

from fff_lightning.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    Args:
        temperature: 0 for greedy decoding (the default: the same answer every time); above 0, sampling at this
            temperature.
        top_p: sample from the smallest set of tokens whose probabilities add up to ``top_p`` (1: all).
        top_k: sample from the ``top_k`` most likely tokens (0: all).
        stop: strings that end an answer; the answer is cut before the first one.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(self.temperature, self.top_p, self.top_k, self.stop, prefix="model.sampling.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self, tokenizer) -> dict:
        """Keyword arguments for ``model.generate``: the decoding settings (sampling ones only when sampling, so
        transformers warns of none) and the stop strings (which need the tokenizer)."""
        kw: dict = {"do_sample": not self.greedy}
        if not self.greedy:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # the model's generation_config may ask for sampling: greedy means greedy
            kw.update(temperature=None, top_p=None, top_k=None)
        if self.stop:
            kw.update(stop_strings=list(self.stop), tokenizer=tokenizer)
        return kw

    def cut(self, text: str) -> str:
        """``text`` up to the first stop string."""
        return cut(text, self.stop)


def check(temperature, top_p, top_k, stop, prefix: str = "--") -> None:
    """Refuse settings that cannot mean anything, in one line naming the option."""
    if not (isinstance(temperature, (int, float)) and 0 <= temperature <= 100):
        raise ConfigError(f"{prefix}temperature", f"must be 0 (greedy) or a positive number; got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ConfigError(f"{prefix}top_p", f"must be in (0, 1]; got {top_p!r}")
    if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
        raise ConfigError(f"{prefix}top_k", f"must be a whole number >= 0 (0: no limit); got {top_k!r}")
    if temperature == 0 and (top_p != 1 or top_k != 0):
        raise ConfigError(f"{prefix}temperature", "top_p and top_k choose among sampled tokens: give a temperature "
                          "above 0 to sample (0 is greedy)")  # fmt: skip
    if any(not isinstance(s, str) or not s for s in stop):
        raise ConfigError(f"{prefix}stop", f"stop strings must be non-empty strings; got {list(stop)!r}")


def cut(text: str, stop) -> str:
    """``text`` up to the first of the ``stop`` strings."""
    end = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:end]


class StopAwareStreamer:
    """A ``transformers`` streamer that writes the answer as it is generated, holding back what might be the start
    of a stop string and stopping its output at one (``model.generate`` may run a token or two past it)."""

    def __init__(self, tokenizer, stop, write, skip_prompt: bool = True):
        self.tokenizer, self.stop, self.write = tokenizer, list(stop), write
        self.skip_prompt = skip_prompt
        self.ids: list[int] = []
        self.shown = 0  # characters of the decoded answer written so far
        self.done = False
        self.text = ""

    def put(self, value) -> None:
        if self.skip_prompt:  # the first call carries the prompt
            self.skip_prompt = False
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        if self.done:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.text = cut(text, self.stop)
        if len(self.text) < len(text):  # a stop string appeared: write up to it, then nothing more
            self.done = True
            ready = len(self.text)
        elif final:
            ready = len(text)
        else:
            # Hold back a tail that could begin a stop string, and an incomplete UTF-8 character (decoded as U+FFFD)
            hold = max((len(s) - 1 for s in self.stop), default=0)
            ready = len(text) - hold
            while ready > 0 and text[ready - 1] == "\ufffd":
                ready -= 1
        if ready > self.shown:
            self.write(text[self.shown : ready])
            self.shown = ready
