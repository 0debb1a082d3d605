"""The strategy-spec language: which decoding strategy to run, and how it is written.

`DecodingSpec` is the frozen, validated description of one strategy (temperature,
filters, penalties, beams); model/decoding.py applies it to logits. `parse_strategy`
is the one place compact strategy strings such as ``top-p:p=0.9,t=0.8`` are read, and
`DecodingSpec.label` writes a spec back in that form.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

from model.errors import UserError


# Below this a temperature is greedy decoding in all but name (a logit gap of 1e-4
# divided by 1e-6 is 100, a probability ratio of e^-100), so the spec asks for 0 instead;
# the floor also keeps logits / t far from float32 overflow.
MIN_TEMPERATURE = 1e-6

# Frequency and presence penalties are limited to OpenAI's documented range, [-2, 2].
MAX_ABS_FREQUENCY_PRESENCE = 2.0


# ----------------------------------------------------------------------------------------
# Parameter checks: each returns a one-line problem description, or None when the value
# is fine. The filters of model/decoding.py raise them one at a time; DecodingSpec.validate
# collects them all.


def is_number(x: object) -> bool:
    """An int or float that is not a bool (JSON's and Python's numbers alike)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_whole(x: object) -> bool:
    """An int that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def temperature_problem(t: float) -> str | None:
    if not is_number(t) or not math.isfinite(t) or t < 0:
        return f"temperature={t!r} is invalid; it must be a finite number >= 0 (0 means greedy decoding)"
    if 0 < t < MIN_TEMPERATURE:
        return f"temperature={t!r} is below the smallest supported {MIN_TEMPERATURE:g}; use 0 for greedy decoding"
    return None


def top_k_problem(k: int) -> str | None:
    if not is_whole(k) or k < 1:
        return f"top_k={k!r} is invalid; it must be a whole number >= 1"
    return None


def top_p_problem(p: float) -> str | None:
    if not is_number(p) or not 0 < p <= 1:
        return f"top_p={p!r} is out of range; it must be in (0, 1] (1 keeps every token)"
    return None


def min_p_problem(min_p: float) -> str | None:
    if not is_number(min_p) or not 0 <= min_p <= 1:
        return f"min_p={min_p!r} is out of range; it must be in [0, 1] (0 keeps every token)"
    return None


def typical_p_problem(mass: float) -> str | None:
    if not is_number(mass) or not 0 < mass <= 1:
        return f"typical_p={mass!r} is out of range; it must be in (0, 1] (1 keeps every token)"
    return None


def repetition_penalty_problem(penalty: float) -> str | None:
    if not is_number(penalty) or not math.isfinite(penalty) or penalty <= 0:
        return f"repetition_penalty={penalty!r} is invalid; it must be a finite number > 0 (1 means no penalty)"
    return None


def frequency_presence_problem(name: str, value: float) -> str | None:
    limit = MAX_ABS_FREQUENCY_PRESENCE
    if not is_number(value) or not -limit <= value <= limit:
        return f"{name}={value!r} is out of range; it must be in [{-limit:g}, {limit:g}] (0 means no penalty)"
    return None


def num_beams_problem(n: int) -> str | None:
    if not is_whole(n) or n < 1:
        return f"num_beams={n!r} is invalid; it must be a whole number >= 1"
    return None


# ----------------------------------------------------------------------------------------
# The spec.


def strategy_kind(temperature: float, num_beams: int) -> str:
    """"beam search" (num_beams > 1), "greedy decoding" (temperature 0) or "sampling": what
    a spec with these settings does; `DecodingSpec.kind` for settings not yet validated."""
    if num_beams > 1:
        return "beam search"
    return "greedy decoding" if temperature == 0 else "sampling"


@dataclasses.dataclass(frozen=True)
class DecodingSpec:
    """One decoding strategy, validated on construction (an invalid spec cannot exist).

    temperature: 1.0 samples from the model's distribution; 0 is greedy decoding.
    top_k, top_p, min_p, typical_p: sampling filters, None = off (see the *_filter functions).
    repetition_penalty: CTRL penalty on every token seen, prompt included; 1.0 = off.
    frequency_penalty, presence_penalty: OpenAI penalties on generated tokens; 0.0 = off.
    num_beams: 1 = one token at a time; > 1 = beam search, run by the generation loop.

    Penalties work with every strategy. The sampling filters do nothing under greedy
    decoding or beam search, and temperature does nothing under beam search, so those
    combinations are rejected rather than silently ignored.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    num_beams: int = 1

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kind(self) -> str:
        """"beam search", "greedy decoding" or "sampling" (see `strategy_kind`)."""
        return strategy_kind(self.temperature, self.num_beams)

    @property
    def is_beam(self) -> bool:
        """Beam search (num_beams > 1); the generation loop runs it, `choose_tokens` does not."""
        return self.kind == "beam search"

    @property
    def is_greedy(self) -> bool:
        """Greedy decoding: temperature 0 without beam search; the next token is the argmax."""
        return self.kind == "greedy decoding"

    @property
    def is_deterministic(self) -> bool:
        """Greedy decoding or beam search: the seed plays no part, so every sample of a
        prompt is the same text."""
        return self.is_greedy or self.is_beam

    @property
    def needs_seen(self) -> bool:
        """Whether `process_logits` needs the `seen` mask (repetition penalty on)."""
        return self.repetition_penalty != 1

    @property
    def needs_counts(self) -> bool:
        """Whether `process_logits` needs the generated-token `counts` (frequency or presence on)."""
        return self.frequency_penalty != 0 or self.presence_penalty != 0

    def _filters(self) -> dict[str, float | int]:
        """The sampling filters that are on, by field name, in pipeline order."""
        values = {"top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p, "typical_p": self.typical_p}
        return {name: value for name, value in values.items() if value is not None}

    def validate(self) -> None:
        """Raise UserError listing, on one line separated by " | ", every out-of-range value and every
        option that would silently do nothing with this strategy."""
        range_problems = {
            "temperature": temperature_problem(self.temperature),
            "top_k": None if self.top_k is None else top_k_problem(self.top_k),
            "top_p": None if self.top_p is None else top_p_problem(self.top_p),
            "min_p": None if self.min_p is None else min_p_problem(self.min_p),
            "typical_p": None if self.typical_p is None else typical_p_problem(self.typical_p),
            "repetition_penalty": repetition_penalty_problem(self.repetition_penalty),
            "frequency_penalty": frequency_presence_problem("frequency_penalty", self.frequency_penalty),
            "presence_penalty": frequency_presence_problem("presence_penalty", self.presence_penalty),
            "num_beams": num_beams_problem(self.num_beams),
        }
        problems = [problem for problem in range_problems.values() if problem is not None]
        # What the other settings mean depends on a valid number of beams, and a value
        # already reported as out of range is not reported again as meaningless.
        if range_problems["num_beams"] is None:
            problems += self._settings_that_do_nothing(skip={name for name, p in range_problems.items() if p})
        if problems:
            raise UserError(" | ".join(problems))

    def _settings_that_do_nothing(self, skip: set[str]) -> list[str]:
        """A problem for each setting that this kind of strategy would silently ignore."""
        unused_filters = {name: value for name, value in self._filters().items() if name not in skip}
        if self.is_beam:
            problems = [
                f"{name}={value!r} does nothing with beam search (num_beams={self.num_beams}); "
                "remove it or use num_beams=1 to sample"
                for name, value in unused_filters.items()
            ]
            if self.temperature != 1 and "temperature" not in skip:
                problems.insert(0, f"temperature={self.temperature!r} does nothing with beam search "
                                   f"(num_beams={self.num_beams}); leave it at 1")
            return problems
        if self.is_greedy:
            return [
                f"{name}={value!r} does nothing with greedy decoding (temperature 0); "
                "remove it or set a temperature > 0 to sample"
                for name, value in unused_filters.items()
            ]
        return []

    @property
    def label(self) -> str:
        """The canonical compact form, e.g. ``top-k:k=40,t=0.8,rep=1.2``; `parse_strategy`
        turns it back into an equal spec.

        One filter on: that strategy's name (``top-k``, ``top-p``, ``min-p``, ``typical``);
        several: ``sample`` with one key per filter; none: ``sample`` at temperature 1,
        ``temperature:t=...`` otherwise. Then ``greedy`` and ``beam:n=...``. Settings at
        their neutral value are left out.
        """
        if self.is_beam:
            name, settings = "beam", [("n", self.num_beams)]
        elif self.is_greedy:
            name, settings = "greedy", []
        else:
            name, settings = self._sampling_label_parts()
        settings += [
            (key, value)
            for key, value, neutral in (
                ("rep", self.repetition_penalty, 1),
                ("freq", self.frequency_penalty, 0),
                ("pres", self.presence_penalty, 0),
            )
            if value != neutral
        ]
        if not settings:
            return name
        return name + ":" + ",".join(f"{key}={_format_number(value)}" for key, value in settings)

    def _sampling_label_parts(self) -> tuple[str, list[tuple[str, float | int]]]:
        temperature = [] if self.temperature == 1 else [("t", self.temperature)]
        filters = [(_FILTER_STRATEGY[field], value) for field, value in self._filters().items()]
        if not filters:
            return ("sample" if not temperature else "temperature"), temperature
        if len(filters) == 1:
            strategy, value = filters[0]
            main_key = _SHORT_FORMS[strategy].main_key
            return strategy, [(main_key, value)] + temperature
        return "sample", temperature + filters


def _format_number(value: float | int) -> str:
    """Shortest text that reads back as the same number: 40, 0.9, 1e-05."""
    if isinstance(value, int):
        return str(value)
    as_float = float(value)
    if as_float.is_integer() and abs(as_float) < 1e15:
        return str(int(as_float))
    return repr(as_float)


# ----------------------------------------------------------------------------------------
# Compact strategy strings.


@dataclasses.dataclass(frozen=True)
class _StrategyForm:
    """How one strategy name reads: its keys (-> DecodingSpec fields), which are required,
    and fields it fixes."""

    keys: dict[str, str]
    required: tuple[str, ...] = ()
    fixed: tuple[tuple[str, float], ...] = ()

    @property
    def main_key(self) -> str:
        return self.required[0]


_PENALTY_KEYS = {"rep": "repetition_penalty", "freq": "frequency_penalty", "pres": "presence_penalty"}
_FILTER_STRATEGY = {"top_k": "top-k", "top_p": "top-p", "min_p": "min-p", "typical_p": "typical"}
_SHORT_FORMS: dict[str, _StrategyForm] = {
    "greedy": _StrategyForm({}, fixed=(("temperature", 0.0),)),
    "sample": _StrategyForm({"t": "temperature", **{name: field for field, name in _FILTER_STRATEGY.items()}}),
    "temperature": _StrategyForm({"t": "temperature"}, required=("t",)),
    "top-k": _StrategyForm({"k": "top_k", "t": "temperature"}, required=("k",)),
    "top-p": _StrategyForm({"p": "top_p", "t": "temperature"}, required=("p",)),
    "min-p": _StrategyForm({"p": "min_p", "t": "temperature"}, required=("p",)),
    "typical": _StrategyForm({"p": "typical_p", "t": "temperature"}, required=("p",)),
    "beam": _StrategyForm({"n": "num_beams"}, required=("n",)),
}
_WHOLE_NUMBER_FIELDS = {"top_k", "num_beams"}
_ALL_KEYS = {key for form in _SHORT_FORMS.values() for key in form.keys} | set(_PENALTY_KEYS)


def parse_strategy(spec: str) -> DecodingSpec:
    """Read a compact strategy string: ``name`` or ``name:key=value,key=value``.

    Names and their keys (required ones first):
      greedy                      temperature 0
      sample: t, top-k, top-p, min-p, typical
                                  sampling, optionally with several filters at once
      temperature: t              sampling at temperature t
      top-k: k, t | top-p: p, t | min-p: p, t | typical: p, t
                                  sampling with one filter, optionally at temperature t
      beam: n                     beam search with n >= 2 beams
    Every name also takes the penalties rep (repetition), freq (frequency) and pres
    (presence). Examples: ``top-p:p=0.9,t=0.8``, ``greedy:rep=1.2``, ``beam:n=4``.

    Raises UserError, naming the problem, for an unknown name (suggesting the closest),
    an unknown or inapplicable key, a repeated key, a value that is not a number (or not a
    whole one for k and n), a missing required key, or a value out of range.
    """
    name, _, settings_text = spec.strip().partition(":")
    name = name.strip()
    form = _SHORT_FORMS.get(name)
    if form is None:
        raise UserError(_unknown_name_message(name))
    accepted = ", ".join([*form.keys, *_PENALTY_KEYS])
    fields: dict[str, float | int] = dict(form.fixed)
    given: set[str] = set()
    for item in settings_text.split(",") if settings_text.strip() else []:
        key, equals, text = (part.strip() for part in item.partition("="))
        if not equals or not key:
            raise UserError(f"'{item.strip()}' in decoding strategy '{spec}' is not of the form key=value")
        field = form.keys.get(key) or _PENALTY_KEYS.get(key)
        if field is None:
            kind = "does not apply to" if key in _ALL_KEYS else "is not a known key of"
            raise UserError(f"'{key}' {kind} decoding strategy '{name}'; it takes {accepted}")
        if key in given:
            raise UserError(f"'{key}' is given twice in decoding strategy '{spec}'")
        given.add(key)
        fields[field] = _parse_number(key, text, whole=field in _WHOLE_NUMBER_FIELDS)
    missing = [key for key in form.required if key not in given]
    if missing:
        raise UserError(f"decoding strategy '{name}' needs {', '.join(missing)}=..., e.g. {_EXAMPLES[name]}")
    if name == "beam" and fields["num_beams"] < 2:
        raise UserError(f"beam search needs n >= 2 beams, got n={fields['num_beams']}; for one beam use 'greedy'")
    try:
        return DecodingSpec(**fields)
    except UserError as error:
        raise UserError(f"decoding strategy '{spec}': {error}") from None


_EXAMPLES = {
    "temperature": "temperature:t=0.7",
    "top-k": "top-k:k=40",
    "top-p": "top-p:p=0.9",
    "min-p": "min-p:p=0.05",
    "typical": "typical:p=0.95",
    "beam": "beam:n=4",
}


def parse_strategy_with_defaults(text: str) -> DecodingSpec:
    """`parse_strategy`, except that a bare name stands for that strategy with its
    default settings (``--strategy top-k`` on the command line): ``greedy``, ``sample``,
    or the settings of the name's example above (k=40, p=0.9, min-p 0.05, typical 0.95,
    4 beams, t=0.7). A compact spec, or a name without defaults, goes to parse_strategy
    as it is, which explains what is wrong with it."""
    return parse_strategy(_EXAMPLES.get(text.strip(), text))


def _unknown_name_message(name: str) -> str:
    choices = ", ".join(_SHORT_FORMS)
    close = difflib.get_close_matches(name, _SHORT_FORMS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown decoding strategy '{name}'{hint} (choose from {choices})"


def _parse_number(key: str, text: str, *, whole: bool) -> float | int:
    try:
        return int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise UserError(f"{key}={text!r} is not {kind}") from None
