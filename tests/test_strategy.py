"""Tests for model/strategy.py: DecodingSpec's validation, labels and the compact-string parser."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.strategy import MIN_TEMPERATURE
from model.errors import UserError
from model.strategy import DecodingSpec, parse_strategy, parse_strategy_with_defaults


# ----------------------------------------------------------------------------------------
# DecodingSpec


def test_spec_defaults_and_properties():
    spec = DecodingSpec()
    assert not spec.is_greedy and not spec.is_beam and spec.label == "sample"
    assert DecodingSpec(temperature=0).is_greedy
    assert DecodingSpec(num_beams=4).is_beam and not DecodingSpec(num_beams=4).is_greedy
    assert DecodingSpec(repetition_penalty=1.1).needs_seen and not DecodingSpec().needs_seen
    assert DecodingSpec(presence_penalty=0.1).needs_counts and not DecodingSpec().needs_counts
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.temperature = 0.5
    assert DecodingSpec(temperature=0).is_deterministic and DecodingSpec(num_beams=2).is_deterministic
    assert not DecodingSpec(top_k=1).is_deterministic  # top-k 1 picks the argmax, but it is still sampled
    assert [DecodingSpec(temperature=0).kind, DecodingSpec(num_beams=2).kind, spec.kind] == [
        "greedy decoding", "beam search", "sampling"]


def test_validate_checks_the_values_it_is_given():
    spec = DecodingSpec(top_k=5)
    object.__setattr__(spec, "top_k", 0)  # what the frozen dataclass normally prevents
    with pytest.raises(UserError, match="top_k=0 is invalid"):
        spec.validate()


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -1.0),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", 1e-9),
        ("temperature", "hot"),
        ("top_k", 0),
        ("top_k", 2.5),
        ("top_k", True),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("typical_p", 0.0),
        ("typical_p", 1.01),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", math.nan),
        ("presence_penalty", -3.0),
        ("num_beams", 0),
        ("num_beams", 2.0),
    ],
)
def test_spec_rejects_each_bad_value(field, value):
    with pytest.raises(UserError) as error:
        DecodingSpec(**{field: value})
    message = str(error.value)
    assert field in message and "\n" not in message


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"temperature": 0, "top_k": 40}, "top_k=40 does nothing with greedy"),
        ({"temperature": 0, "top_p": 0.9}, "top_p=0.9 does nothing with greedy"),
        ({"temperature": 0, "min_p": 0.1}, "min_p=0.1 does nothing with greedy"),
        ({"temperature": 0, "typical_p": 0.9}, "typical_p=0.9 does nothing with greedy"),
        ({"num_beams": 4, "top_p": 0.9}, "top_p=0.9 does nothing with beam search"),
        ({"num_beams": 4, "top_k": 5}, "top_k=5 does nothing with beam search"),
        ({"num_beams": 4, "temperature": 0.7}, "temperature=0.7 does nothing with beam search"),
        ({"num_beams": 4, "temperature": 0}, "temperature=0 does nothing with beam search"),
    ],
)
def test_spec_rejects_options_that_would_do_nothing(kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        DecodingSpec(**kwargs)


def test_spec_accepts_penalties_with_every_strategy():
    penalties = {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": -0.5}
    DecodingSpec(temperature=0, **penalties)
    DecodingSpec(num_beams=3, **penalties)
    DecodingSpec(top_k=40, top_p=0.9, min_p=0.05, typical_p=0.95, temperature=0.8, **penalties)


def test_spec_reports_every_problem_on_one_line():
    with pytest.raises(UserError) as error:
        DecodingSpec(temperature=-1, top_k=0, top_p=2.0)
    message = str(error.value)
    assert "\n" not in message
    problems = message.split(" | ")
    assert len(problems) == 3
    assert [problem.split("=")[0] for problem in problems] == ["temperature", "top_k", "top_p"]
    with pytest.raises(UserError) as error:  # out of range and pointless: reported once
        DecodingSpec(temperature=0, top_k=0)
    assert str(error.value).count("top_k") == 1


# ----------------------------------------------------------------------------------------
# parse_strategy and label


@pytest.mark.parametrize(
    "text, expected",
    [
        ("greedy", DecodingSpec(temperature=0.0)),
        ("sample", DecodingSpec()),
        ("temperature:t=0.7", DecodingSpec(temperature=0.7)),
        ("top-k:k=40", DecodingSpec(top_k=40)),
        ("top-k:k=40,t=0.8", DecodingSpec(top_k=40, temperature=0.8)),
        ("top-p:p=0.9,t=0.8", DecodingSpec(top_p=0.9, temperature=0.8)),
        ("min-p:p=0.05", DecodingSpec(min_p=0.05)),
        ("typical:p=0.95", DecodingSpec(typical_p=0.95)),
        ("beam:n=4", DecodingSpec(num_beams=4)),
        ("greedy:rep=1.2", DecodingSpec(temperature=0.0, repetition_penalty=1.2)),
        ("top-p:p=0.9,freq=0.5,pres=0.25", DecodingSpec(top_p=0.9, frequency_penalty=0.5, presence_penalty=0.25)),
        ("beam:n=3,rep=1.5", DecodingSpec(num_beams=3, repetition_penalty=1.5)),
        ("sample:top-k=40,top-p=0.9", DecodingSpec(top_k=40, top_p=0.9)),
        ("eta:eta=0.01", DecodingSpec(eta_cutoff=0.01)),
        ("epsilon:eps=0.02,t=0.9", DecodingSpec(epsilon_cutoff=0.02, temperature=0.9)),
        ("top-n-sigma:n=1.5", DecodingSpec(top_n_sigma=1.5)),
        ("top-h:h=0.4", DecodingSpec(top_h=0.4)),
        ("xtc:threshold=0.2,prob=0.5", DecodingSpec(xtc_threshold=0.2, xtc_probability=0.5)),
        ("mirostat:tau=4,lr=0.2", DecodingSpec(mirostat=2, mirostat_tau=4.0, mirostat_eta=0.2)),
        ("mirostat1", DecodingSpec(mirostat=1)),
        ("dry:mult=0.8,base=2,allowed=3,last=64", DecodingSpec(dry_multiplier=0.8, dry_base=2.0,
                                                              dry_allowed_length=3, dry_penalty_last_n=64)),
        ("greedy:dry=0.5,dry-breakers=%5B%22%5Cn%22%5D", DecodingSpec(temperature=0.0, dry_multiplier=0.5,
                                                                      dry_sequence_breakers=("\n",))),
        ("min-p:p=0.1,t=1.5,order=temperature-last", DecodingSpec(min_p=0.1, temperature=1.5,
                                                                  order="temperature-last")),
        ("sample:min-p=0.1,xtc-prob=0.3", DecodingSpec(min_p=0.1, xtc_probability=0.3)),
        ("  top-k : k = 40 , t = 0.5 ", DecodingSpec(top_k=40, temperature=0.5)),
    ],
)
def test_parse_good_specs(text, expected):
    assert parse_strategy(text) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "unknown decoding strategy ''"),
        ("topk:k=40", "did you mean 'top-k'"),
        ("nucleus", "choose from greedy, sample"),
        ("top-k:p=0.9", "'p' does not apply to decoding strategy 'top-k'; it takes k, t, order, rep, freq, pres, "
                        "dry, dry-base"),
        ("greedy:order=temperature-last", "'order' does not apply to decoding strategy 'greedy'"),
        ("min-p:p=0.1,order=backwards", "order='backwards' is not a known chain order"),
        ("sample:order=temperature-last", "order='temperature-last' does nothing without a sampling filter"),
        ("xtc:threshold=0.2", "'xtc' needs prob=..., e.g. xtc:threshold=0.1,prob=0.5"),
        ("xtc:prob=0.5,threshold=0.6", "xtc_threshold=0.6 is out of range"),
        ("mirostat:tau=0", "mirostat_tau=0.0 is invalid"),
        ("mirostat:top-k=3", "'top-k' does not apply to decoding strategy 'mirostat'"),
        ("dry:mult=0.8,allowed=1.5", "allowed='1.5' is not a whole number"),
        ("dry:mult=0.8,last=0", "dry_penalty_last_n=0 is invalid"),
        ("dry:mult=0.8,breakers=x", "is not a percent-encoded JSON list"),
        ("top-p:p=0.9,dry-base=2", "dry_base=2.0 does nothing without dry_multiplier"),
        ("eta:eta=1", "eta_cutoff=1.0 is out of range"),
        ("epsilon:eps=0", "epsilon_cutoff=0.0 is out of range"),
        ("top-n-sigma:n=-1", "top_n_sigma=-1.0 is invalid"),
        ("top-h:h=1.5", "top_h=1.5 is out of range"),
        ("greedy:dry=0.8,dry-allowed=-1", "dry_allowed_length=-1 is invalid"),
        ("greedy:t=0.5", "'t' does not apply to decoding strategy 'greedy'"),
        ("beam:n=4,t=0.7", "'t' does not apply"),
        ("top-k:k=40,temp=0.7", "'temp' is not a known key"),
        ("top-k:k=forty", "k='forty' is not a whole number"),
        ("top-k:k=4.5", "k='4.5' is not a whole number"),
        ("top-p:p=high", "p='high' is not a number"),
        ("top-p:p=", "p='' is not a number"),
        ("top-p:t=0.8", "'top-p' needs p=..., e.g. top-p:p=0.9"),
        ("beam", "'beam' needs n="),
        ("beam:n=1", "n >= 2"),
        ("top-k:k=40,k=50", "'k' is given twice"),
        ("top-k:k=40,", "is not of the form key=value"),
        ("top-k:40", "'40' in decoding strategy 'top-k:40' is not of the form key=value"),
        ("top-p:p=1.5", "top_p=1.5 is out of range"),
        ("temperature:t=-1", "temperature=-1.0 is invalid"),
        ("top-k:k=0", "top_k=0 is invalid"),
        ("greedy:rep=0", "repetition_penalty=0.0 is invalid"),
    ],
)
def test_parse_bad_specs(text, fragment):
    with pytest.raises(UserError) as error:
        parse_strategy(text)
    assert fragment in str(error.value)


def test_labels_are_canonical():
    assert DecodingSpec(top_k=40, temperature=0.8).label == "top-k:k=40,t=0.8"
    assert DecodingSpec(temperature=0, repetition_penalty=1.2).label == "greedy:rep=1.2"
    assert DecodingSpec(temperature=0.7).label == "temperature:t=0.7"
    assert DecodingSpec(num_beams=4, presence_penalty=0.5).label == "beam:n=4,pres=0.5"
    assert DecodingSpec(top_k=40, top_p=0.9).label == "sample:top-k=40,top-p=0.9"
    assert parse_strategy("sample:top-p=0.9").label == "top-p:p=0.9"  # one filter: its own name
    assert parse_strategy("temperature:t=1").label == "sample"
    assert DecodingSpec(eta_cutoff=0.01, temperature=0.8).label == "eta:eta=0.01,t=0.8"
    assert DecodingSpec(xtc_probability=0.5).label == "xtc:threshold=0.1,prob=0.5"
    assert DecodingSpec(mirostat=2).label == "mirostat:tau=5,lr=0.1"
    assert DecodingSpec(dry_multiplier=0.8, temperature=0.7, repetition_penalty=1.1).label == "dry:mult=0.8,t=0.7,rep=1.1"
    assert DecodingSpec(top_k=40, dry_multiplier=0.8, dry_base=2).label == "top-k:k=40,dry=0.8,dry-base=2"
    assert DecodingSpec(top_h=0.5, xtc_probability=0.2).label == "sample:top-h=0.5,xtc-threshold=0.1,xtc-prob=0.2"
    assert DecodingSpec(min_p=0.1, temperature=2, order="temperature-last").label == (
        "min-p:p=0.1,t=2,order=temperature-last")


def test_settings_of_a_step_that_is_off_or_ignored_are_rejected():
    for kwargs, fragment in [
        ({"xtc_threshold": 0.2}, "xtc_threshold=0.2 does nothing without xtc_probability"),
        ({"mirostat_tau": 3.0}, "mirostat_tau=3.0 does nothing without mirostat"),
        ({"dry_allowed_length": 3}, "dry_allowed_length=3 does nothing without dry_multiplier"),
        ({"mirostat": 2, "top_k": 40}, "top_k=40 does nothing with mirostat"),
        ({"mirostat": 2, "xtc_probability": 0.5}, "xtc_probability=0.5 does nothing with mirostat"),
        ({"temperature": 0, "xtc_probability": 0.5}, "xtc_probability=0.5 does nothing with greedy decoding"),
        ({"temperature": 0, "mirostat": 2}, "mirostat=2 does nothing with greedy decoding"),
        ({"num_beams": 3, "eta_cutoff": 0.01}, "eta_cutoff=0.01 does nothing with beam search"),
        ({"num_beams": 3, "top_n_sigma": 1.0, "order": "temperature-last"}, "order='temperature-last' does nothing"),
        ({"mirostat": 3}, "mirostat=3 is invalid"),
        ({"dry_sequence_breakers": ("",)}, "dry_sequence_breakers=('',) is invalid"),
    ]:
        with pytest.raises(UserError, match=re.escape(fragment)):
            DecodingSpec(**kwargs)
    DecodingSpec(temperature=0, dry_multiplier=0.8)  # DRY is a penalty: every strategy takes it
    DecodingSpec(num_beams=3, dry_multiplier=0.8, dry_allowed_length=3)
    DecodingSpec(mirostat=1, dry_multiplier=0.8, repetition_penalty=1.2, temperature=0.8)
    assert DecodingSpec(dry_sequence_breakers=["a"], dry_multiplier=1).dry_sequence_breakers == ("a",)  # lists: tuples


@st.composite
def decoding_specs(draw) -> DecodingSpec:
    penalties = {
        "repetition_penalty": draw(st.just(1.0) | st.floats(0.01, 10.0)),
        "frequency_penalty": draw(st.just(0.0) | st.floats(-2.0, 2.0)),
        "presence_penalty": draw(st.just(0.0) | st.floats(-2.0, 2.0)),
    }
    kind = draw(st.sampled_from(["greedy", "beam", "sample", "mirostat"]))
    dry = draw(st.just({}) | st.fixed_dictionaries({
        "dry_multiplier": st.floats(0.01, 5.0),
        "dry_base": st.just(1.75) | st.floats(1.0, 4.0),
        "dry_allowed_length": st.just(2) | st.integers(0, 10),
        "dry_penalty_last_n": st.just(-1) | st.integers(1, 4096),
        "dry_sequence_breakers": st.just(("\n", ":", '"', "*")) | st.lists(
            st.text(min_size=1, max_size=3), max_size=3).map(tuple),
    }))
    if kind == "greedy":
        return DecodingSpec(temperature=0.0, **penalties, **dry)
    if kind == "beam":
        return DecodingSpec(num_beams=draw(st.integers(2, 16)), **penalties, **dry)
    temperature = draw(st.just(1.0) | st.floats(MIN_TEMPERATURE, 100.0))
    if kind == "mirostat":
        return DecodingSpec(temperature=temperature, mirostat=draw(st.sampled_from([1, 2])),
                            mirostat_tau=draw(st.floats(0.01, 20.0)), mirostat_eta=draw(st.floats(0.001, 1.0)),
                            **penalties, **dry)
    xtc = draw(st.just({}) | st.fixed_dictionaries({"xtc_probability": st.floats(0.0, 1.0, exclude_min=True),
                                                     "xtc_threshold": st.floats(0.0, 0.5)}))
    filters = {
        "top_k": draw(st.none() | st.integers(1, 100_000)),
        "top_p": draw(st.none() | st.floats(0.0, 1.0, exclude_min=True)),
        "min_p": draw(st.none() | st.floats(0.0, 1.0)),
        "typical_p": draw(st.none() | st.floats(0.0, 1.0, exclude_min=True)),
        "top_n_sigma": draw(st.none() | st.floats(0.001, 10.0)),
        "top_h": draw(st.none() | st.floats(0.0, 1.0, exclude_min=True)),
        "epsilon_cutoff": draw(st.none() | st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)),
        "eta_cutoff": draw(st.none() | st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)),
    }
    has_filter = xtc or any(value is not None for value in filters.values())
    order = draw(st.sampled_from(["temperature-first", "temperature-last"])) if has_filter else "temperature-first"
    return DecodingSpec(temperature=temperature, order=order, **filters, **xtc, **penalties, **dry)


@settings(max_examples=200, deadline=None)
@given(spec=decoding_specs())
def test_label_parses_back_to_an_equal_spec(spec):
    assert parse_strategy(spec.label) == spec
    assert " " not in spec.label


@pytest.mark.parametrize("text, expected", [
    ("greedy", DecodingSpec(temperature=0.0)),
    ("sample", DecodingSpec()),
    ("temperature", DecodingSpec(temperature=0.7)),
    ("top-k", DecodingSpec(top_k=40)),
    (" top-p ", DecodingSpec(top_p=0.9)),
    ("min-p", DecodingSpec(min_p=0.05)),
    ("typical", DecodingSpec(typical_p=0.95)),
    ("beam", DecodingSpec(num_beams=4)),
    ("eta", DecodingSpec(eta_cutoff=0.0009)),
    ("epsilon", DecodingSpec(epsilon_cutoff=0.0003)),
    ("top-n-sigma", DecodingSpec(top_n_sigma=1.0)),
    ("top-h", DecodingSpec(top_h=0.4)),
    ("xtc", DecodingSpec(xtc_probability=0.5)),
    ("mirostat", DecodingSpec(mirostat=2)),
    ("dry", DecodingSpec(dry_multiplier=0.8)),
    ("top-k:k=7,t=0.5", DecodingSpec(top_k=7, temperature=0.5)),  # a full spec is read as it is
])
def test_bare_names_take_their_default_settings(text, expected):
    assert parse_strategy_with_defaults(text) == expected


def test_a_bad_name_or_spec_with_defaults_is_explained_by_the_parser():
    with pytest.raises(UserError, match="did you mean 'top-k'"):
        parse_strategy_with_defaults("topk")
    with pytest.raises(UserError, match="top_k=0 is invalid"):
        parse_strategy_with_defaults("top-k:k=0")
