"""The strategy-spec language: which decoding strategy to run, and how it is written.

`DecodingSpec` is the frozen, validated description of one strategy (temperature,
filters, penalties, beams); model/decoding.py applies it to logits. `parse_strategy`
is the one place compact strategy strings such as ``top-p:p=0.9,t=0.8`` are read, and
`DecodingSpec.label` writes a spec back in that form.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import urllib.parse

from model.errors import UserError


# Below this a temperature is greedy decoding in all but name (a logit gap of 1e-4
# divided by 1e-6 is 100, a probability ratio of e^-100), so the spec asks for 0 instead;
# the floor also keeps logits / t far from float32 overflow.
MIN_TEMPERATURE = 1e-6

# Frequency and presence penalties are limited to OpenAI's documented range, [-2, 2].
MAX_ABS_FREQUENCY_PRESENCE = 2.0

# DRY's sequence breakers as llama.cpp ships them (common.h: "\n", ":", "\"", "*"): a
# repetition is never matched across one, so the dialogue format "NAME:" can repeat.
DRY_SEQUENCE_BREAKERS = ("\n", ":", "\"", "*")

# The sampling chain: the steps between the penalties and the draw, in the order they run.
# "temperature-first" is transformers' order (its warpers run temperature, top-h, top-k,
# top-p, min-p, typical, epsilon, eta) with llama.cpp's two extras placed as llama.cpp
# places them relative to the filters: top-n-sigma first, on the whole vocabulary (its
# standard deviation is over every finite logit), XTC last. "temperature-last" is
# llama.cpp's default chain order: the same filters, then temperature. Each filter sees
# what the steps before it left, so the two orders keep different sets whenever a filter
# that depends on the temperature (every one but top-k and top-n-sigma) is on.
SAMPLING_CHAIN = (
    "temperature", "top_n_sigma", "top_h", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "xtc",
)
CHAIN_ORDERS = {
    "temperature-first": SAMPLING_CHAIN,
    "temperature-last": SAMPLING_CHAIN[1:] + SAMPLING_CHAIN[:1],
}
DEFAULT_ORDER = "temperature-first"


def chain_order_text(order: str = DEFAULT_ORDER) -> str:
    """One line naming every step of a chain order, e.g. for `--explain` and the comparison:
    "chain order temperature-first: penalties > dry > temperature > top-n-sigma > ... > xtc
    > mirostat > sample"."""
    steps = ["penalties", "dry", *(_STEP_NAMES[step] for step in CHAIN_ORDERS[order]), "mirostat", "sample"]
    return f"chain order {order}: {' > '.join(steps)}"


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


def cutoff_problem(name: str, value: float) -> str | None:
    """eta_cutoff and epsilon_cutoff: a probability in (0, 1), as transformers requires."""
    if not is_number(value) or not 0 < value < 1:
        return f"{name}={value!r} is out of range; it must be in (0, 1) (e.g. 3e-4 for a 50k vocabulary)"
    return None


def top_n_sigma_problem(n: float) -> str | None:
    if not is_number(n) or not math.isfinite(n) or n <= 0:
        return f"top_n_sigma={n!r} is invalid; it must be a finite number > 0 (standard deviations below the maximum)"
    return None


def top_h_problem(top_h: float) -> str | None:
    if not is_number(top_h) or not 0 < top_h <= 1:
        return f"top_h={top_h!r} is out of range; it must be in (0, 1] (the share of the entropy kept)"
    return None


def xtc_problem(name: str, value: float) -> str | None:
    """xtc_probability in [0, 1]; xtc_threshold in [0, 0.5] (above 0.5 at most one token can
    reach it, and XTC never removes the only one: llama.cpp turns XTC off there)."""
    high = 0.5 if name == "xtc_threshold" else 1.0
    if not is_number(value) or not 0 <= value <= high:
        return f"{name}={value!r} is out of range; it must be in [0, {high:g}]"
    return None


def mirostat_problem(name: str, value: float | int) -> str | None:
    if name == "mirostat":
        if value not in (0, 1, 2) or isinstance(value, bool) or not is_whole(value):
            return f"mirostat={value!r} is invalid; it must be 0 (off), 1 or 2 (the version)"
        return None
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        return f"{name}={value!r} is invalid; it must be a finite number > 0"
    return None


def dry_problem(name: str, value: object) -> str | None:
    """DRY's settings: multiplier >= 0 (0 off), base >= 1, allowed length a whole number
    >= 0, penalty_last_n a whole number >= 1 or -1 (the model's context), breakers a
    sequence of non-empty strings."""
    if name == "dry_multiplier" and (not is_number(value) or not math.isfinite(value) or value < 0):
        return f"dry_multiplier={value!r} is invalid; it must be a finite number >= 0 (0 turns DRY off)"
    if name == "dry_base" and (not is_number(value) or not math.isfinite(value) or value < 1):
        return f"dry_base={value!r} is invalid; it must be a finite number >= 1"
    if name == "dry_allowed_length" and (not is_whole(value) or value < 0):
        return f"dry_allowed_length={value!r} is invalid; it must be a whole number >= 0"
    if name == "dry_penalty_last_n" and (not is_whole(value) or value == 0 or value < -1):
        return (f"dry_penalty_last_n={value!r} is invalid; it must be a whole number >= 1, or -1 for the "
                "model's whole context")
    if name == "dry_sequence_breakers" and (
            not isinstance(value, tuple) or not all(isinstance(b, str) and b for b in value)):
        return f"dry_sequence_breakers={value!r} is invalid; it must be a list of non-empty strings"
    return None


def order_problem(order: str) -> str | None:
    if order not in CHAIN_ORDERS:
        return f"order={order!r} is not a known chain order; choose from {', '.join(CHAIN_ORDERS)}"
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
    top_k, top_p, min_p, typical_p, top_n_sigma, top_h, epsilon_cutoff, eta_cutoff:
        sampling filters, None = off (see the *_filter functions of model/decoding.py).
    xtc_probability, xtc_threshold: exclude top choices; probability 0 = off.
    mirostat (0 off, 1 or 2: the version), mirostat_tau (target surprise, bits),
        mirostat_eta (its learning rate): mirostat chooses its own cutoff, so it takes no
        other filter (as in llama.cpp, whose chain is temperature then mirostat).
    repetition_penalty: CTRL penalty on every token seen, prompt included; 1.0 = off.
    frequency_penalty, presence_penalty: OpenAI penalties on generated tokens; 0.0 = off.
    dry_multiplier (0 = off), dry_base, dry_allowed_length, dry_penalty_last_n (-1: the
        model's context), dry_sequence_breakers: the DRY penalty (llama.cpp's defaults).
    order: the order of the sampling chain, a key of `CHAIN_ORDERS`.
    num_beams: 1 = one token at a time; > 1 = beam search, run by the generation loop.

    Penalties (DRY included) work with every strategy. The sampling steps do nothing under
    greedy decoding or beam search, and temperature does nothing under beam search, so
    those combinations are rejected rather than silently ignored, as is every setting of a
    step that is off (xtc_threshold without xtc_probability, dry_base without
    dry_multiplier, ...).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    top_n_sigma: float | None = None
    top_h: float | None = None
    epsilon_cutoff: float | None = None
    eta_cutoff: float | None = None
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: tuple[str, ...] = DRY_SEQUENCE_BREAKERS
    order: str = DEFAULT_ORDER
    num_beams: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.dry_sequence_breakers, list):  # JSON and argparse give lists; the spec is hashable
            object.__setattr__(self, "dry_sequence_breakers", tuple(self.dry_sequence_breakers))
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

    @property
    def uses_dry(self) -> bool:
        """Whether the DRY penalty is on (it needs each row's token history)."""
        return self.dry_multiplier != 0

    @property
    def uses_xtc(self) -> bool:
        """Whether XTC is on (it needs a coin per row and step, drawn from the row's generator)."""
        return self.xtc_probability != 0

    @property
    def is_stateful(self) -> bool:
        """Whether a row's next-token distribution depends on more than its logits and
        penalties: mirostat's mu (updated from each sampled token's surprise), XTC's coin
        (drawn from the row's generator at every step) or DRY's token history. These need
        the per-row state of the token loop (decoding.PenaltyState), and a verifier that
        replays the distribution of several positions at once (speculative decoding)
        cannot reproduce them exactly: mirostat's state after a token depends on the token."""
        return self.mirostat != 0 or self.uses_xtc or self.uses_dry

    @property
    def chain(self) -> tuple[str, ...]:
        """The steps this spec runs, in order: penalties, then the sampling chain of
        `order` (only the steps that are on), then how the token is chosen. E.g.
        ("repetition", "temperature", "top-k", "min-p", "sample")."""
        steps = [name for name, on in (("repetition", self.needs_seen), ("frequency/presence", self.needs_counts),
                                        ("dry", self.uses_dry)) if on]
        if self.is_beam:
            return (*steps, "beam")
        if self.is_greedy:
            return (*steps, "argmax")
        on = {"temperature": self.temperature != 1, "xtc": self.uses_xtc, **{f: True for f in self._filters()}}
        steps += [_STEP_NAMES[step] for step in CHAIN_ORDERS[self.order] if on.get(step)]
        if self.mirostat:
            steps.append(f"mirostat{'' if self.mirostat == 2 else '1'}")
        return (*steps, "sample")

    def _filters(self) -> dict[str, float | int]:
        """The sampling filters that are on, by field name, in the default chain order."""
        values = {field: getattr(self, field) for field in _FILTER_FIELDS}
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
            "top_n_sigma": None if self.top_n_sigma is None else top_n_sigma_problem(self.top_n_sigma),
            "top_h": None if self.top_h is None else top_h_problem(self.top_h),
            "epsilon_cutoff": None if self.epsilon_cutoff is None else cutoff_problem("epsilon_cutoff",
                                                                                     self.epsilon_cutoff),
            "eta_cutoff": None if self.eta_cutoff is None else cutoff_problem("eta_cutoff", self.eta_cutoff),
            "xtc_probability": xtc_problem("xtc_probability", self.xtc_probability),
            "xtc_threshold": xtc_problem("xtc_threshold", self.xtc_threshold),
            **{name: mirostat_problem(name, getattr(self, name)) for name in _MIROSTAT_FIELDS},
            "repetition_penalty": repetition_penalty_problem(self.repetition_penalty),
            "frequency_penalty": frequency_presence_problem("frequency_penalty", self.frequency_penalty),
            "presence_penalty": frequency_presence_problem("presence_penalty", self.presence_penalty),
            **{name: dry_problem(name, getattr(self, name)) for name in _DRY_FIELDS},
            "order": order_problem(self.order),
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
        problems = [
            f"{name}={getattr(self, name)!r} does nothing without {switch} (off); remove it or turn {switch} on"
            for switch, on, names in (("xtc_probability", self.uses_xtc, ("xtc_threshold",)),
                                      ("mirostat", self.mirostat != 0, _MIROSTAT_FIELDS[1:]),
                                      ("dry_multiplier", self.uses_dry, _DRY_FIELDS[1:]))
            if not on and switch not in skip
            for name in names
            if name not in skip and getattr(self, name) != _DEFAULTS[name]
        ]
        sampling_steps = {name: value for name, value in self._filters().items() if name not in skip}
        sampling_steps.update({name: getattr(self, name) for name in ("xtc_probability", "mirostat", "order")
                               if getattr(self, name) != _DEFAULTS[name] and name not in skip})
        if self.is_beam:
            problems += [
                f"{name}={value!r} does nothing with beam search (num_beams={self.num_beams}); "
                "remove it or use num_beams=1 to sample"
                for name, value in sampling_steps.items()
            ]
            if self.temperature != 1 and "temperature" not in skip:
                problems.insert(0, f"temperature={self.temperature!r} does nothing with beam search "
                                   f"(num_beams={self.num_beams}); leave it at 1")
            return problems
        if self.is_greedy:
            return problems + [
                f"{name}={value!r} does nothing with greedy decoding (temperature 0); "
                "remove it or set a temperature > 0 to sample"
                for name, value in sampling_steps.items()
            ]
        if self.mirostat and "mirostat" not in skip:
            problems += [
                f"{name}={value!r} does nothing with mirostat, which sets its own cutoff (llama.cpp ignores the "
                "other filters too); remove it or turn mirostat off"
                for name, value in {**self._filters(), "xtc_probability": self.xtc_probability}.items()
                if name not in skip and value != _DEFAULTS[name]
            ]
        if self.order != DEFAULT_ORDER and "order" not in skip and not (self._filters() or self.uses_xtc):
            problems.append(f"order={self.order!r} does nothing without a sampling filter (only the temperature "
                            "would move); remove it or add a filter")
        return problems

    @property
    def label(self) -> str:
        """The canonical compact form, e.g. ``top-k:k=40,t=0.8,rep=1.2``; `parse_strategy`
        turns it back into an equal spec.

        Mirostat: ``mirostat:tau=...,lr=...`` (``mirostat1`` for version 1). One filter or
        XTC alone: that strategy's name (``top-k``, ``top-p``, ``min-p``, ``typical``,
        ``top-n-sigma``, ``top-h``, ``epsilon``, ``eta``, ``xtc``); several: ``sample``
        with one key per step; none: ``dry`` when DRY is on, else ``sample`` at
        temperature 1, ``temperature:t=...`` otherwise. Then ``greedy`` and
        ``beam:n=...``. A non-default chain order adds ``order=...``; the penalties and
        DRY follow. Settings at their neutral value are left out.
        """
        if self.is_beam:
            name, settings = "beam", [("n", self.num_beams)]
        elif self.is_greedy:
            name, settings = "greedy", []
        else:
            name, settings = self._sampling_label_parts()
            if self.order != DEFAULT_ORDER:
                settings.append(("order", self.order))
        settings += [(key, getattr(self, field)) for key, field in _PENALTY_KEYS.items()
                     if getattr(self, field) != _DEFAULTS[field]]
        if self.uses_dry:  # under the name dry its own keys, first
            keys = _SHORT_FORMS["dry"].keys if name == "dry" else _DRY_KEYS
            dry = [(key, getattr(self, field)) for key, field in keys.items()
                   if field in _DRY_FIELDS and (field == "dry_multiplier" or getattr(self, field) != _DEFAULTS[field])]
            settings = dry + settings if name == "dry" else settings + dry
        if not settings:
            return name
        return name + ":" + ",".join(f"{key}={_format_value(value)}" for key, value in settings)

    def _sampling_label_parts(self) -> tuple[str, list[tuple[str, object]]]:
        temperature = [] if self.temperature == 1 else [("t", self.temperature)]
        if self.mirostat:
            name = "mirostat" if self.mirostat == 2 else "mirostat1"
            return name, [("tau", self.mirostat_tau), ("lr", self.mirostat_eta)] + temperature
        xtc = [("threshold", self.xtc_threshold), ("prob", self.xtc_probability)] if self.uses_xtc else []
        filters = [(_FILTER_STRATEGY[field], value) for field, value in self._filters().items()]
        if not filters and not xtc:
            if self.uses_dry:
                return "dry", temperature
            return ("sample" if not temperature else "temperature"), temperature
        if not filters:
            return "xtc", xtc + temperature
        if len(filters) == 1 and not xtc:
            strategy, value = filters[0]
            main_key = _SHORT_FORMS[strategy].main_key
            return strategy, [(main_key, value)] + temperature
        return "sample", temperature + filters + [(f"xtc-{key}", value) for key, value in xtc]


def _format_number(value: float | int) -> str:
    """Shortest text that reads back as the same number: 40, 0.9, 1e-05."""
    if isinstance(value, int):
        return str(value)
    as_float = float(value)
    if as_float.is_integer() and abs(as_float) < 1e15:
        return str(int(as_float))
    return repr(as_float)


def _format_value(value: object) -> str:
    """A number as `_format_number`; a chain order as its name; sequence breakers as a JSON
    list, percent-encoded so that no comma or equals sign of theirs ends the key."""
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        return urllib.parse.quote(json.dumps(list(value)), safe="")
    return _format_number(value)


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


_FILTER_FIELDS = tuple(step for step in SAMPLING_CHAIN if step not in ("temperature", "xtc"))
_FILTER_STRATEGY = {
    "top_n_sigma": "top-n-sigma", "top_h": "top-h", "top_k": "top-k", "top_p": "top-p", "min_p": "min-p",
    "typical_p": "typical", "epsilon_cutoff": "epsilon", "eta_cutoff": "eta",
}
_STEP_NAMES = {"temperature": "temperature", "xtc": "xtc", **_FILTER_STRATEGY}  # as DecodingSpec.chain shows them
_MIROSTAT_FIELDS = ("mirostat", "mirostat_tau", "mirostat_eta")
_DRY_FIELDS = ("dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers")
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(DecodingSpec)}

_PENALTY_KEYS = {"rep": "repetition_penalty", "freq": "frequency_penalty", "pres": "presence_penalty"}
_DRY_KEYS = {"dry": "dry_multiplier", "dry-base": "dry_base", "dry-allowed": "dry_allowed_length",
             "dry-last": "dry_penalty_last_n", "dry-breakers": "dry_sequence_breakers"}
_ORDER_KEY = {"order": "order"}  # on every sampling strategy
_T = {"t": "temperature"}
_SHORT_FORMS: dict[str, _StrategyForm] = {
    "greedy": _StrategyForm({}, fixed=(("temperature", 0.0),)),
    "sample": _StrategyForm({**_T, **{name: field for field, name in _FILTER_STRATEGY.items()},
                             "xtc-threshold": "xtc_threshold", "xtc-prob": "xtc_probability"}),
    "temperature": _StrategyForm(_T, required=("t",)),
    "top-k": _StrategyForm({"k": "top_k", **_T}, required=("k",)),
    "top-p": _StrategyForm({"p": "top_p", **_T}, required=("p",)),
    "min-p": _StrategyForm({"p": "min_p", **_T}, required=("p",)),
    "typical": _StrategyForm({"p": "typical_p", **_T}, required=("p",)),
    "top-n-sigma": _StrategyForm({"n": "top_n_sigma", **_T}, required=("n",)),
    "top-h": _StrategyForm({"h": "top_h", **_T}, required=("h",)),
    "epsilon": _StrategyForm({"eps": "epsilon_cutoff", **_T}, required=("eps",)),
    "eta": _StrategyForm({"eta": "eta_cutoff", **_T}, required=("eta",)),
    "xtc": _StrategyForm({"threshold": "xtc_threshold", "prob": "xtc_probability", **_T}, required=("prob",)),
    "mirostat": _StrategyForm({"tau": "mirostat_tau", "lr": "mirostat_eta", **_T}, fixed=(("mirostat", 2),)),
    "mirostat1": _StrategyForm({"tau": "mirostat_tau", "lr": "mirostat_eta", **_T}, fixed=(("mirostat", 1),)),
    "dry": _StrategyForm({"mult": "dry_multiplier", "base": "dry_base", "allowed": "dry_allowed_length",
                          "last": "dry_penalty_last_n", "breakers": "dry_sequence_breakers", **_T},
                         required=("mult",)),
    "beam": _StrategyForm({"n": "num_beams"}, required=("n",)),
}
_WHOLE_NUMBER_FIELDS = {"top_k", "num_beams", "dry_allowed_length", "dry_penalty_last_n"}
_DETERMINISTIC_NAMES = ("greedy", "beam")


def _keys_of(name: str) -> dict[str, str]:
    """Every key a strategy name takes: its own, the chain order (sampling names), the
    penalties and DRY's (except under ``dry``, whose own keys are DRY's)."""
    form = _SHORT_FORMS[name]
    order = {} if name in _DETERMINISTIC_NAMES else _ORDER_KEY
    dry = {} if name == "dry" else _DRY_KEYS
    return {**form.keys, **order, **_PENALTY_KEYS, **dry}


_ALL_KEYS = {key for name in _SHORT_FORMS for key in _keys_of(name)}


def parse_strategy(spec: str) -> DecodingSpec:
    """Read a compact strategy string: ``name`` or ``name:key=value,key=value``.

    Names and their keys (required ones first):
      greedy                      temperature 0
      sample: t, top-k, top-p, min-p, typical, top-n-sigma, top-h, epsilon, eta,
              xtc-threshold, xtc-prob
                                  sampling, optionally with several filters at once
      temperature: t              sampling at temperature t
      top-k: k, t | top-p: p, t | min-p: p, t | typical: p, t | top-n-sigma: n, t |
      top-h: h, t | epsilon: eps, t | eta: eta, t
                                  sampling with one filter, optionally at temperature t
      xtc: prob, threshold, t     exclude top choices with probability prob
      mirostat: tau, lr, t | mirostat1: tau, lr, t
                                  mirostat version 2 or 1 (target surprise tau in bits)
      dry: mult, base, allowed, last, breakers, t
                                  sampling with the DRY penalty
      beam: n                     beam search with n >= 2 beams
    Every sampling name also takes ``order`` (temperature-first or temperature-last, see
    `CHAIN_ORDERS`); every name takes the penalties rep (repetition), freq (frequency),
    pres (presence) and DRY's dry, dry-base, dry-allowed, dry-last, dry-breakers.
    Breakers are a JSON list of strings, percent-encoded (``%5B%22%5Cn%22%5D`` is
    ``["\\n"]``), as `DecodingSpec.label` writes them. Examples: ``top-p:p=0.9,t=0.8``,
    ``greedy:rep=1.2``, ``beam:n=4``, ``min-p:p=0.1,t=1.5,order=temperature-last``.

    Raises UserError, naming the problem, for an unknown name (suggesting the closest),
    an unknown or inapplicable key, a repeated key, a value that is not a number (or not a
    whole one for k, n, allowed and last), a missing required key, or a value out of range.
    """
    name, _, settings_text = spec.strip().partition(":")
    name = name.strip()
    form = _SHORT_FORMS.get(name)
    if form is None:
        raise UserError(_unknown_name_message(name))
    keys = _keys_of(name)
    accepted = ", ".join(keys)
    fields: dict[str, object] = dict(form.fixed)
    given: set[str] = set()
    for item in settings_text.split(",") if settings_text.strip() else []:
        key, equals, text = (part.strip() for part in item.partition("="))
        if not equals or not key:
            raise UserError(f"'{item.strip()}' in decoding strategy '{spec}' is not of the form key=value")
        field = keys.get(key)
        if field is None:
            kind = "does not apply to" if key in _ALL_KEYS else "is not a known key of"
            raise UserError(f"'{key}' {kind} decoding strategy '{name}'; it takes {accepted}")
        if key in given:
            raise UserError(f"'{key}' is given twice in decoding strategy '{spec}'")
        given.add(key)
        fields[field] = _parse_value(key, field, text)
    missing = [key for key in form.required if key not in given]
    if missing:
        raise UserError(f"decoding strategy '{name}' needs {', '.join(missing)}=..., e.g. {_EXAMPLES[name]}")
    if name == "beam" and fields["num_beams"] < 2:
        raise UserError(f"beam search needs n >= 2 beams, got n={fields['num_beams']}; for one beam use 'greedy'")
    try:
        return DecodingSpec(**fields)
    except UserError as error:
        raise UserError(f"decoding strategy '{spec}': {error}") from None


# The settings a bare name stands for (`parse_strategy_with_defaults`). Eta and epsilon are
# the values Hewitt et al. (2022) found best for GPT-2 sized vocabularies (50k tokens); a
# cutoff is an absolute probability, so for a vocabulary of V tokens the same strength is
# about eps * 50257 / V (see `decoding.epsilon_filter`). top-h 0.4 is transformers' example,
# XTC, DRY and mirostat are llama.cpp's documented starting points.
_EXAMPLES = {
    "temperature": "temperature:t=0.7",
    "top-k": "top-k:k=40",
    "top-p": "top-p:p=0.9",
    "min-p": "min-p:p=0.05",
    "typical": "typical:p=0.95",
    "top-n-sigma": "top-n-sigma:n=1",
    "top-h": "top-h:h=0.4",
    "epsilon": "epsilon:eps=0.0003",
    "eta": "eta:eta=0.0009",
    "xtc": "xtc:threshold=0.1,prob=0.5",
    "mirostat": "mirostat:tau=5,lr=0.1",
    "mirostat1": "mirostat1:tau=5,lr=0.1",
    "dry": "dry:mult=0.8",
    "beam": "beam:n=4",
}


def parse_strategy_with_defaults(text: str) -> DecodingSpec:
    """`parse_strategy`, except that a bare name stands for that strategy with its
    default settings (``--strategy top-k`` on the command line): ``greedy``, ``sample``,
    or the settings of the name's example above (k=40, p=0.9, min-p 0.05, typical 0.95,
    4 beams, t=0.7, ...). A compact spec, or a name without defaults, goes to
    parse_strategy as it is, which explains what is wrong with it."""
    return parse_strategy(_EXAMPLES.get(text.strip(), text))


def _unknown_name_message(name: str) -> str:
    choices = ", ".join(_SHORT_FORMS)
    close = difflib.get_close_matches(name, _SHORT_FORMS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown decoding strategy '{name}'{hint} (choose from {choices})"


def _parse_value(key: str, field: str, text: str) -> object:
    """The value of one key: a chain order's name, a list of breakers, or a number."""
    if field == "order":
        return text
    if field == "dry_sequence_breakers":
        try:
            breakers = json.loads(urllib.parse.unquote(text))
        except ValueError:
            breakers = None
        if not isinstance(breakers, list):
            raise UserError(f"{key}={text!r} is not a percent-encoded JSON list of strings, e.g. %5B%22%5Cn%22%5D")
        return tuple(breakers)
    return _parse_number(key, text, whole=field in _WHOLE_NUMBER_FIELDS)


def _parse_number(key: str, text: str, *, whole: bool) -> float | int:
    try:
        return int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise UserError(f"{key}={text!r} is not {kind}") from None
