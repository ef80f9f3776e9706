"""The owner's policy file: every rule refused with its line, the limits, the audit of changes.

The file is checked before a server uses it (``fdrtd-server policy check``)
and again by the running server on the next request after it changed; a bad
file must name the line to mend, and must never be half-used.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest

from fdrtd_server.audit import AuditLog
from fdrtd_server.cli import main
from fdrtd_server.errors import Forbidden, TooManyRequests
from fdrtd_server.policy import (
    AUDIT_ACTOR,
    TEMPLATE,
    DatasetPolicy,
    Policy,
    PolicyError,
    PolicyStore,
    RunningJobs,
    job_deadline,
)
from fdrtd_server.sdk import suppress
from microservices.compute import aggregate_values

GOOD = """\
version = "2026-12-07"

[defaults]
min_cohort = 5

[datasets.patients]
functions = ["smpc.count", "map.*"]
small_cell = 10

[datasets.patients.privacy]
dp = false

[datasets.patients.bounds]
age = [0, 120]
"""


def test_the_template_init_writes_is_valid_and_states_the_built_in_defaults() -> None:
    policy = Policy.parse(TEMPLATE)
    assert policy.defaults == DatasetPolicy()
    assert policy.version.startswith("1+")


def test_a_good_file_fills_each_dataset_from_the_defaults() -> None:
    policy = Policy.parse(GOOD)
    patients = policy.of("patients")
    assert patients.min_cohort == 5  # from [defaults]
    assert patients.small_cell == 10
    assert not patients.privacy.dp
    assert patients.bounds == {"age": (0.0, 120.0)}
    assert policy.of("other") == policy.defaults
    label, digest = policy.version.split("+")
    assert label == "2026-12-07" and len(digest) == 12
    # a change the owner forgot to label still changes the version
    assert Policy.parse(GOOD.replace("120", "110")).version != policy.version


BAD = [
    # (text, line, part of the message)
    (
        'version = "x"\n[defaults]\nmin_cohort = 0\n',
        3,
        "'min_cohort' must be an integer from 1 to 2147483647",
    ),
    ('version = "x"\n[defaults]\nsmall_cell = 2.5\n', 3, "'small_cell' must be an integer"),
    ('version = "x"\n[defaults]\nmax_concurrent = 0\n', 3, "'max_concurrent'"),
    ('version = "x"\n[defaults]\n\njob_timeout = 0\n', 4, "'job_timeout' must be more than 0"),
    ('version = "x"\n[defaults]\njob_timeout = 86401\n', 3, "at most 86400"),
    ('version = "x"\n[defaults]\nmin_cohort = true\n', 3, "must be an integer"),
    ('version = "x"\n[datasets.p]\nfunctions = ["smpc.Count"]\n', 3, "'functions' must list"),
    ('version = "x"\n[datasets.p]\nfunctions = "smpc.*"\n', 3, "'functions' must list"),
    ('version = "x"\n[datasets.p]\nfunctions = ["smpc"]\n', 3, "'functions' must list"),
    ('version = "x"\n\n[datasets.Patients]\nmin_cohort = 3\n', 3, "dataset name"),
    ('version = "x"\n[datasets."d-0"]\nmin_cohort = 3\n', 2, "not a data handle"),
    ('version = "x"\n[datasets.p.privacy]\nepsilon = 0\n', 3, "'epsilon' must be greater than 0"),
    ('version = "x"\n[datasets.p.privacy]\ntotal_epsilon = -1\n', 3, "'total_epsilon'"),
    (
        'version = "x"\n[datasets.p.privacy]\ndelta = 1\n',
        3,
        "'delta' must be at least 0 and below 1",
    ),
    ('version = "x"\n[datasets.p.privacy]\nanalyst_delta = -0.1\n', 3, "'analyst_delta'"),
    (
        'version = "x"\n[datasets.p.privacy]\nmechanism = "exponential"\n',
        3,
        '"laplace" or "gaussian"',
    ),
    ('version = "x"\n[datasets.p.privacy]\nmechanism = "gaussian"\n', 3, "needs a 'delta' greater"),
    ('version = "x"\n[datasets.p.privacy]\ndp = "yes"\n', 3, "'dp' must be true or false"),
    ('version = "x"\n[datasets.p.privacy]\nepsilon = 2.0\n', 3, "no query could run"),
    ('version = "x"\n[datasets.p.privacy]\nmin_epsilon = 0\n', 3, "'min_epsilon' must be greater"),
    ('version = "x"\n[datasets.p.privacy]\nmin_epsilon = 0.5\n', 3, "'min_epsilon' is above"),
    (
        'version = "x"\n[datasets.p.privacy]\nepsilon = 0.01\n\nmin_epsilon = 0.1\n',
        5,
        "'min_epsilon' is above 'epsilon'",
    ),
    ('version = "x"\n[datasets.p.privacy]\nsigma = 1\n', 3, "unknown key 'sigma'"),
    ('version = "x"\n[datasets.p.bounds]\nage = [120, 0]\n', 3, "[lower, upper]"),
    ('version = "x"\n[datasets.p.bounds]\nage = [0, inf]\n', 3, "numbers from -1e+18 to 1e+18"),
    ('version = "x"\n[datasets.p.bounds]\nage = ["0", "1"]\n', 3, "[lower, upper]"),
    ('version = "x"\n[datasets.p]\nmin_cohrt = 3\n', 3, "unknown key 'min_cohrt'"),
    ('version = "x"\n[datasets.p]\nprivacy = 1\n', 3, "must be a table"),
    ('version = "x"\n[datasets.p]\nbounds = []\n', 3, "must be a table"),
    ('version = "x"\ndatasets.p.min_cohort = 0\n', 2, "'min_cohort'"),
    ('version = "x"\n[datasets.p]\nprivacy = { epsilon = -1 }\n', 3, "'epsilon'"),
    ('version = "x"\n[defualts]\nmin_cohort = 3\n', 2, "unknown key 'defualts'"),
    ('version = ""\n', 1, "'version' must be the owner's label"),
    ('version = "x\\ny"\n', 1, "'version' must be the owner's label"),
    ("[defaults]\nmin_cohort = 3\n", 1, "'version' must be the owner's label"),
    ('version = "x"\n[defaults]\nmin_cohort = \n', 3, "not valid TOML"),
    ('version = "x"\n[defaults\n', 2, "not valid TOML"),
    ('version = "x"\nfunctions = [\n', 2, "not valid TOML"),
    # integers a computation could not carry, floats beyond any sane range (review F4)
    ('version = "x"\n[defaults]\nmax_concurrent = 99999999999999999999\n', 3, "2147483647"),
    ('version = "x"\n[defaults]\nmin_cohort = 9223372036854775807\n', 3, "2147483647"),
    ('version = "x"\n[datasets.p]\nsmall_cell = 2147483648\n', 3, "'small_cell'"),
    ('version = "x"\n[datasets.p.privacy]\ntotal_epsilon = 1e300\n', 3, "at most 1e+06"),
    ('version = "x"\n[datasets.p.privacy]\nepsilon = nan\n', 3, "must be finite"),
    ('version = "x"\n[defaults.bounds]\nage = [0, 1e308]\n', 3, "-1e+18 to 1e+18"),
    ('version = "x"\n[defaults.bounds]\nage = [0, 99999999999999999999]\n', 3, "1e+18"),
    ('version = "x"\n[defaults]\njob_timeout = inf\n', 3, "must be finite"),
    ('version = "x"\n[datasets.p]\nanalyst_inputs = "yes"\n', 3, "'analyst_inputs' must be true"),
    ('version = "x"\n[defaults]\nanalyst_inputs = 1\n', 3, "'analyst_inputs' must be true"),
]


def test_the_epsilon_floor_is_a_privacy_key_with_a_default_and_is_public() -> None:
    policy = Policy.parse('version = "x"\n[datasets.p.privacy]\nmin_epsilon = 0.01\n')
    assert Policy().defaults.privacy.min_epsilon == 0.001
    assert policy.of("p").privacy.min_epsilon == 0.01
    assert policy.of("p").public(3)["min_epsilon"] == 0.01
    assert DatasetPolicy.from_dict(policy.of("p").to_dict()) == policy.of("p")  # on the bus
    assert Policy.parse(TEMPLATE).defaults == DatasetPolicy()  # the template states it


HUGE = 10**400
"""An integer no float can hold."""


@pytest.mark.parametrize(
    "text",
    [
        f'version = "x"\n[defaults.bounds]\nage = [0, {HUGE}]\n',
        f'version = "x"\n[defaults.privacy]\nepsilon = {HUGE}\n',
        f'version = "x"\n[defaults]\njob_timeout = {HUGE}\n',
        f'version = "x"\n[defaults]\nmin_cohort = {"9" * 5000}\n',
    ],
)
def test_numbers_beyond_a_float_or_python_s_digit_limit_are_refused_not_raised(
    text: str,
) -> None:
    # an integer too large for a float raised OverflowError, one of more than 4300
    # digits ValueError: a 500 on every computation instead of the 503 of a bad file
    with pytest.raises(PolicyError):
        Policy.parse(text, "policy.toml")


@pytest.mark.parametrize(("text", "line", "part"), BAD)
def test_each_broken_rule_is_refused_naming_its_line(text: str, line: int, part: str) -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.parse(text, "policy.toml")
    assert caught.value.line == line, str(caught.value)
    assert str(caught.value).startswith(f"policy.toml:{line}: ")
    assert part in str(caught.value)


def test_a_message_never_echoes_an_odd_key_or_value() -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.parse('version = "x"\n[defaults]\n"secret value 12345" = 3\n')
    assert "12345" not in str(caught.value) and "a key" in str(caught.value)
    with pytest.raises(PolicyError) as caught:
        Policy.parse('version = "x"\n[datasets.p.bounds]\nage = [987654, 3]\n')
    assert "987654" not in str(caught.value)


def test_functions_the_policy_forbids_are_refused_naming_the_dataset_and_what_it_allows() -> None:
    policy = Policy.parse(GOOD + "\n[datasets.locked]\nfunctions = []\n")
    policy.check_functions(["patients"], "map", "aggregate")
    policy.check_functions(["patients"], "smpc", "count")
    with pytest.raises(Forbidden) as caught:
        policy.check_functions(["patients"], "smpc", "secure_sum")
    assert "'patients'" in caught.value.message
    assert "smpc.count, map.*" in caught.value.message
    with pytest.raises(Forbidden, match="allows: none"):
        policy.check_functions(["locked"], "map", "aggregate")
    # on the bus, "no function" stays "no function"
    assert DatasetPolicy.from_dict(policy.of("locked").to_dict()).functions == ()


def test_the_whole_job_timeout_is_the_shortest_of_the_datasets_else_the_defaults() -> None:
    policy = Policy.parse(
        'version = "x"\n[defaults]\njob_timeout = 100\n'
        "[datasets.a]\njob_timeout = 30\n[datasets.b]\njob_timeout = 50\n"
    )
    seconds, error = job_deadline(policy.message(["a", "b"])) or (0, None)
    assert seconds == 30 and error is not None
    assert "whole-job timeout of 30 s set by the policy of dataset 'a'" in error.message
    assert error.status == 504
    seconds, error = job_deadline(policy.message([])) or (0, None)
    assert seconds == 100 and error is not None and "defaults" in error.message
    assert job_deadline({}) is None


def test_a_caller_is_refused_past_max_concurrent_and_counted_off_when_jobs_end() -> None:
    running = RunningJobs()
    limits = Policy.parse('version = "x"\n[datasets.p]\nmax_concurrent = 2\n').limits(["p"])
    alive = {"r1": True, "r2": True, "r4": True}

    async def is_alive(handle: str) -> bool:
        return alive.get(handle, False)

    async def scenario() -> None:
        await running.admit("r1", "ann", limits, is_alive)
        running.started("r1", {"status": "running"})
        await running.admit("r2", "ann", limits, is_alive)
        running.started("r2", {"status": "running"})
        await running.admit("b1", "bob", limits, is_alive)  # another caller: her own count
        with pytest.raises(TooManyRequests) as caught:
            await running.admit("r3", "ann", limits, is_alive)
        assert caught.value.status == 429
        assert "max_concurrent = 2" in caught.value.message
        assert "dataset 'p'" in caught.value.message
        running.end("r1")  # its end was reported
        await running.admit("r3", "ann", limits, is_alive)
        running.started("r3", {"status": "done"})  # ended within ?wait=: off at once
        await running.admit("r4", "ann", limits, is_alive)
        running.started("r4", {"status": "running"})
        # an end report that never came: the record says it ended
        alive["r2"] = False
        await running.admit("r5", "ann", limits, is_alive)
        assert running.count("ann", "p") == 2

    asyncio.run(scenario())


def test_own_uploads_are_limited_by_the_defaults() -> None:
    policy = Policy.parse('version = "x"\n[defaults]\nmax_concurrent = 1\n')
    assert policy.limits([]) == {"": (1, "this server's default")}


def _records(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text("utf-8").splitlines() if line.strip()]


def test_the_store_follows_changes_and_audits_each_version_and_refusal(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.log")
    store = PolicyStore(tmp_path, audit)
    assert store.current().version == "default"
    assert not (tmp_path / "audit.log").exists() or not _records(tmp_path / "audit.log")
    path = tmp_path / "policy.toml"
    path.write_text(GOOD, "utf-8")
    first = store.current()
    assert first.of("patients").small_cell == 10
    assert store.current() is first  # not read again while unchanged
    path.write_text(GOOD.replace("small_cell = 10", "small_cell = zehn"), "utf-8")
    for _ in range(3):  # refused on every request, audited once
        with pytest.raises(PolicyError, match=r"policy.toml:8: "):
            store.current()
    path.write_text(GOOD.replace("small_cell = 10", "small_cell = 20") + "[datasets.x]\n", "utf-8")
    second = store.current()
    assert second.of("patients").small_cell == 20
    path.unlink()
    assert store.current().version == "default"
    audit.close()
    records = [r for r in _records(tmp_path / "audit.log") if r["action"] == "policy"]
    assert [r["principal"] for r in records] == [AUDIT_ACTOR] * 4
    loaded, refused, changed, removed = records
    assert loaded["target"] == first.version and loaded["added"] == "patients"
    assert loaded["previous"] == "default" and loaded["defaults"] == "changed"
    assert refused["outcome"] == "refused" and refused["line"] == 8
    assert changed["target"] == second.version and changed["previous"] == first.version
    assert changed["changed"] == "patients" and changed["added"] == "x"
    assert removed["target"] == "default" and removed["removed"] == "patients,x"
    # names, never values (the chain's hashes, the times and the versions, which end in
    # hex digits, are left out: they may hold any number)
    hashed = ("hash", "prev", "time", "target", "previous")
    fields = [json.dumps({k: v for k, v in r.items() if k not in hashed}) for r in records]
    text = "\n".join(fields)
    assert "120" not in text and "20," not in text


def test_a_rewrite_of_the_same_size_within_the_same_tick_is_seen(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    path = tmp_path / "policy.toml"
    path.write_text(GOOD, "utf-8")
    before = store.current().version
    replacement = tmp_path / "new.toml"
    replacement.write_text(GOOD.replace("small_cell = 10", "small_cell = 11"), "utf-8")
    stat = path.stat()
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    replacement.replace(path)  # same size and time; another file
    assert store.current().version != before


def test_policy_check_prints_the_version_or_the_bad_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(GOOD, "utf-8")
    assert main(["policy", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"version {Policy.parse(GOOD).version}\n")
    assert "patients: functions smpc.count, map.*; min_cohort 5, small_cell 10; no dp" in out
    path.write_text(GOOD.replace('["smpc.count", "map.*"]', '["smpc count"]'), "utf-8")
    assert main(["policy", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:7: [datasets.patients] 'functions' must list")
    path.write_bytes(b'version = "\xff"\n')
    assert main(["policy", "check", str(path)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_init_writes_the_template_and_policy_show_prints_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "server"
    assert main(["init", str(home), "--name", "solo", "--port", "18000"]) == 0
    assert (home / "policy.toml").read_text("utf-8") == TEMPLATE
    capsys.readouterr()
    assert main(["policy", "show", str(home)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == Policy.parse(TEMPLATE).version
    assert shown["defaults"]["min_cohort"] == 3


def test_empty_cells_of_a_named_dataset_look_like_small_ones() -> None:
    counts = np.array([0, 3, 40, 50])
    assert suppress(counts, 5).tolist() == [False, True, True, False]  # 0 shown
    assert suppress(counts, 5, empty=True).tolist() == [True, True, True, False]
    # an empty and a small cell alone are hidden together, with enough beside them
    # that their sum says nothing: [0, 0, 100, 200] shows neither as 0
    hidden = suppress(np.array([0, 0, 100, 200]), 5, empty=True)
    assert hidden.tolist() == [True, True, True, False]
    # nothing to hide: nothing hidden
    assert not suppress(np.array([10, 20]), 5, empty=True).any()


@pytest.mark.parametrize("seed", range(20))
def test_whether_a_hidden_cell_is_empty_is_never_known(seed: int) -> None:
    """With empty cells hidden, the hidden cells hold at least the threshold: any may be 0."""
    rng = np.random.default_rng(seed)
    counts = rng.choice([0, 0, 1, 2, 4, 7, 30], size=int(rng.integers(2, 8)))
    minimum = 5
    hidden = suppress(counts, minimum, empty=True)
    assert not ((counts < minimum) & ~hidden).any()  # small or empty: never shown
    if hidden.any() and not hidden.all():
        assert hidden.sum() >= 2 and counts[hidden].sum() >= minimum


def test_a_histogram_of_a_named_dataset_hides_empty_bins_at_the_small_cell_threshold() -> None:
    values = np.concatenate([np.full(4, 0.5), np.full(30, 2.5), np.full(12, 3.5)])
    edges = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    own = aggregate_values(values, edges, 5)["histogram"]
    assert own["counts"] == [None, 0, 30, None]  # 4 hidden, 12 beside it; 0 shown
    named = aggregate_values(values, edges, 10, empty=True)["histogram"]
    # 4, 0 and the empty "other" hide 4 records: 12 is hidden with them
    assert named["counts"] == [None, None, 30, None]
    assert named["other"] is None  # the empty "other" cell too


# --- files no parser should meet (review F3), and what the catalogue shows (F1) -----------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('version = "1"\n[defaults]\nbounds = ' + "{a=" * 3000 + "1" + "}" * 3000, "nested"),
        ('version = "1"\nx = ' + "[" * 5000 + "]" * 5000 + "\n", "nested"),
        ('version = "1"\n' + "#" * (1 << 20) + "\n", "larger than 1048576 bytes"),
    ],
)
def test_a_file_that_would_break_the_parser_is_a_policy_error(text: str, reason: str) -> None:
    with pytest.raises(PolicyError, match=reason):
        Policy.parse(text)


def test_an_unreadable_or_huge_file_is_refused_and_audited_like_an_invalid_one(
    tmp_path: Path,
) -> None:
    audit = AuditLog(tmp_path / "audit.log")
    store = PolicyStore(tmp_path, audit)
    path = tmp_path / "policy.toml"
    path.mkdir()  # a directory where the file should be
    for _ in range(2):
        with pytest.raises(PolicyError, match=r"cannot be read"):
            store.current()
    path.rmdir()
    path.write_text(GOOD + "#" * (1 << 20), "utf-8")
    with pytest.raises(PolicyError, match="larger than 1048576 bytes"):
        store.current()
    path.write_text('version = "1"\n[defaults]\nbounds = ' + "{a=" * 3000 + "1" + "}" * 3000)
    with pytest.raises(PolicyError, match="nested too deeply"):
        store.current()
    path.write_text(GOOD, "utf-8")
    assert store.current().of("patients").small_cell == 10
    audit.close()
    refused = [r for r in _records(tmp_path / "audit.log") if r.get("outcome") == "refused"]
    assert [r["reason"].split(" (")[0].split(";")[0] for r in refused] == [
        "the file cannot be read",
        "the file is larger than 1048576 bytes",
        "tables or arrays are nested too deeply",
    ]


def test_policy_check_names_a_deep_huge_unreadable_or_missing_file_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('version = "1"\n[defaults]\nbounds = ' + "{a=" * 3000 + "1" + "}" * 3000)
    assert main(["policy", "check", str(path)]) == 2
    assert "nested too deeply" in capsys.readouterr().err
    path.write_text('version = "1"\n[defaults]\nmax_concurrent = 99999999999999999999\n')
    assert main(["policy", "check", str(path)]) == 2
    assert f"{path}:3: [defaults] 'max_concurrent' must be" in capsys.readouterr().err
    path.unlink()
    assert main(["policy", "check", str(path)]) == 2
    assert "no such file" in capsys.readouterr().err
    path.mkdir()
    assert main(["policy", "check", str(path)]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_a_file_changed_while_it_is_read_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An in-place edit: the first read sees half of it, and the file changes meanwhile."""
    store = PolicyStore(tmp_path)
    path = tmp_path / "policy.toml"
    whole = GOOD.replace("small_cell = 10", "small_cell = 12")
    half = whole[: whole.index("[datasets.patients.privacy]")]  # valid TOML: dp stays on
    path.write_text(half, "utf-8")
    reads: list[str] = []
    read = Policy.read

    def racing(file: Path) -> Policy:
        found = read(file)
        reads.append(found.version)
        if len(reads) == 1:  # the owner's editor writes the rest meanwhile
            path.write_text(whole, "utf-8")
        return found

    monkeypatch.setattr(Policy, "read", staticmethod(racing))
    policy = store.current()
    assert len(reads) == 2 and policy.version == Policy.parse(whole).version
    assert not policy.of("patients").privacy.dp  # never the half without its privacy table

    def always_changing(file: Path) -> Policy:
        found = read(file)
        path.write_text(path.read_text("utf-8") + "\n", "utf-8")
        return found

    monkeypatch.setattr(Policy, "read", staticmethod(always_changing))
    path.write_text(GOOD, "utf-8")
    with pytest.raises(PolicyError, match="changed while it was read"):
        store.current()


def test_analyst_inputs_is_a_dataset_key_off_by_default_and_shown_in_the_catalogue() -> None:
    policy = Policy.parse(
        'version = "x"\n[defaults]\nanalyst_inputs = true\n[datasets.p]\nanalyst_inputs = false\n'
    )
    assert DatasetPolicy().analyst_inputs is False
    assert policy.defaults.analyst_inputs and not policy.of("p").analyst_inputs
    assert policy.of("other").analyst_inputs  # from [defaults]
    for dataset in (policy.defaults, policy.of("p")):
        assert DatasetPolicy.from_dict(dataset.to_dict()) == dataset
        assert dataset.public(3)["analyst_inputs"] is dataset.analyst_inputs
    assert "analyst_inputs false" in policy.of("p").summary()
    assert "analyst_inputs = false" in TEMPLATE


def test_a_broken_file_is_read_once_while_it_stays_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PolicyStore(tmp_path)
    path = tmp_path / "policy.toml"
    path.write_text(GOOD.replace("small_cell = 10", "small_cell = zehn"), "utf-8")
    reads: list[Path] = []
    read = Policy.read

    def counted(file: Path) -> Policy:
        reads.append(file)
        return read(file)

    monkeypatch.setattr(Policy, "read", staticmethod(counted))
    for _ in range(5):  # refused on every request ...
        with pytest.raises(PolicyError, match=r"policy.toml:8: "):
            store.current()
    assert len(reads) == 1  # ... but read and parsed once
    path.write_text(GOOD, "utf-8")  # mended: read again
    assert store.current().of("patients").small_cell == 10
    assert len(reads) == 2
