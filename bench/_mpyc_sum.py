"""One MPyC party of the reference benchmarks (started three times by ``references.py``).

    python bench/_mpyc_sum.py -P 127.0.0.1:P0 -P 127.0.0.1:P1 -P 127.0.0.1:P2 -I i \\
        --no-log --task vector --size 1000000 --repeat 1

MPyC is a library, not a server: each party is one process that runs the whole
program and talks to the others over TCP (MPyC's own ``-P host:port`` and
``-I index`` options). Party ``i`` makes up its own data from the seed ``i``,
so party 0 can check the opened result against the plain computation.

Tasks (all with MPyC's secure fixed-point numbers ``mpc.SecFxp``):

- ``scalar``: each party inputs one number, the parties add the three shares
  and open the sum; ``--repeat`` times in one session.
- ``vector``: each party inputs a ``--size``-element vector (a secure array of
  the default ``SecFxp()``: 32 bits, 16 of them fractional); the parties add
  them elementwise and open the sum.
- ``univariate``: mean and variance of ``--size`` values per party, the way
  fdrtd computes them: local count and sum, secure sum, open the mean; then the
  local centred sum of squares, secure sum, open. ``SecFxp(64)``.
- ``univariate_shared``: mean and variance with every value secret-shared:
  each party inputs all ``--size`` values, the parties sum them in MPC, open the
  mean, then compute the centred sum of squares as a secure inner product.
  ``SecFxp(64, 16)``.

Party 0 prints one JSON line: ``{"task", "seconds": [...], "error"}``, where
``seconds`` are in-protocol times (from the first synchronised round after all
parties connected to the opened result, per repetition) and ``error`` is the
largest deviation from the plain result.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from typing import Any

import numpy as np
from mpyc.runtime import mpc  # parses and removes MPyC's own options from sys.argv

PARTIES = 3


def _data(pid: int, size: int, task: str) -> np.ndarray:
    rng = np.random.default_rng(1000 + pid)
    if task == "vector":
        return rng.normal(0, 1000, size)
    return rng.normal(120, 15, size)


async def _sync() -> None:
    # one opened round trip: every party has reached this point
    await mpc.output(mpc.input(mpc.SecInt(16)(1))[0])


async def scalar(size: int) -> tuple[float, float]:
    secfxp = mpc.SecFxp()
    value = float(mpc.pid + 1)
    start = time.perf_counter()
    total = await mpc.output(mpc.sum(mpc.input(secfxp(value))))
    elapsed = time.perf_counter() - start
    return elapsed, abs(float(total) - sum(range(1, PARTIES + 1)))


async def vector(size: int) -> tuple[float, float]:
    secfxp = mpc.SecFxp()
    mine = _data(mpc.pid, size, "vector")
    start = time.perf_counter()
    shared = mpc.input(secfxp.array(mine))
    total = await mpc.output(shared[0] + shared[1] + shared[2])
    elapsed = time.perf_counter() - start
    expected = sum(_data(pid, size, "vector") for pid in range(PARTIES))
    return elapsed, float(np.max(np.abs(np.asarray(total, dtype=float) - expected)))


def _expected_mean_variance(size: int) -> tuple[float, float]:
    values = np.concatenate([_data(pid, size, "univariate") for pid in range(PARTIES)])
    return float(values.mean()), float(values.var(ddof=1))


async def univariate(size: int) -> tuple[float, float]:
    secfxp = mpc.SecFxp(64)
    mine = _data(mpc.pid, size, "univariate")
    start = time.perf_counter()
    local = secfxp.array(np.array([float(mine.size), float(mine.sum())]))
    count, total = await mpc.output(mpc.np_sum(mpc.np_stack(mpc.input(local)), axis=0))
    mean = float(total) / float(count)
    squares = secfxp(float(((mine - mean) ** 2).sum()))
    centred = float(await mpc.output(mpc.sum(mpc.input(squares))))
    variance = centred / (float(count) - 1)
    elapsed = time.perf_counter() - start
    want_mean, want_variance = _expected_mean_variance(size)
    return elapsed, max(abs(mean - want_mean), abs(variance - want_variance))


async def univariate_shared(size: int) -> tuple[float, float]:
    secfxp = mpc.SecFxp(64, 16)
    mine = _data(mpc.pid, size, "univariate")
    start = time.perf_counter()
    shared = mpc.input(secfxp.array(mine))
    count = PARTIES * size  # the sizes are public here
    total = await mpc.output(mpc.np_sum(shared[0]) + mpc.np_sum(shared[1]) + mpc.np_sum(shared[2]))
    mean = float(total) / count
    centred = [x - mean for x in shared]
    squares = await mpc.output(mpc.sum([x @ x for x in centred]))
    variance = float(squares) / (count - 1)
    elapsed = time.perf_counter() - start
    want_mean, want_variance = _expected_mean_variance(size)
    return elapsed, max(abs(mean - want_mean), abs(variance - want_variance))


TASKS = {
    "scalar": scalar,
    "vector": vector,
    "univariate": univariate,
    "univariate_shared": univariate_shared,
}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    await mpc.start()
    await _sync()
    seconds = []
    error = 0.0
    for _ in range(args.repeat):
        await _sync()
        elapsed, deviation = await TASKS[args.task](args.size)
        seconds.append(elapsed)
        error = max(error, deviation)
    await mpc.shutdown()
    return {"task": args.task, "size": args.size, "seconds": seconds, "error": error}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--size", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1)
    arguments = parser.parse_args()
    # MPyC's parties listen on all interfaces (create_server without a host);
    # the benchmarks use 127.0.0.1 only
    mpc._loop.create_server = functools.partial(mpc._loop.create_server, host="127.0.0.1")
    result = mpc.run(main(arguments))
    if mpc.pid == 0:
        print(json.dumps(result), flush=True)
