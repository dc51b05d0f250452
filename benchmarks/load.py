"""Bounded load on the scoring server and the UI over loopback, with mixed input kinds and some bad requests.

Starts both servers for MODEL_URI the way `make serve` and `make ui` do (one scoring worker, one UI worker),
runs --concurrency client threads for --duration-s seconds, and reports per server: requests/s, p50/p99
latency, the error rate on good requests (must be 0), whether every bad request got its 4xx, and the
server's resident memory after the warm-up and at the end (must be flat).

    python benchmarks/load.py                                  # concurrency 16 for 60 s
    python benchmarks/load.py --concurrency 4 --duration-s 10
    python benchmarks/load.py --worst-case                     # 8 clients sending the heaviest requests

--worst-case: 8 more client threads each send, again and again, the most work one request may ask for
(images decoding to contract.MAX_REQUEST_PIXELS); they must get 200 or 429, never an error, while the
--concurrency clients' good requests (single images) keep p99 under 1 s and memory stays flat.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from fmnist_pyfunc import config, contract, data
from fmnist_testkit import harness

DEFAULT_CONCURRENCY = 16
DEFAULT_DURATION_S = 60.0
WARMUP_FRACTION = 0.2   # memory "before" is taken after this share of the run: caches and arenas are filled
REQUEST_TIMEOUT_S = 30
MEMORY_GROWTH_LIMIT = 0.10  # flat: the end within 10 % of the post-warm-up figure
BATCH = 32              # images in the batch requests of the mix
HEAVY_CLIENTS = 8
GOOD_P99_LIMIT_S = 1.0  # --worst-case: good requests' p99 while the heavy ones run


@dataclass
class Case:
    """One kind of request in the mix: where it goes, how, and the status it must get."""
    name: str
    target: str         # "scoring" or "ui", or "heavy" for --worst-case's heaviest requests
    expected: int
    send: object        # callable(session, urls) -> requests.Response
    also_fine: tuple = ()  # statuses as good as `expected` (a heavy request may be told to come back: 429)


@dataclass
class Tally:
    latencies: list = field(default_factory=list)   # seconds, good requests answered as expected
    good: int = 0
    good_errors: int = 0
    bad: int = 0
    bad_wrong: int = 0     # bad requests not answered with their 4xx
    examples: list = field(default_factory=list)    # a few unexpected answers, for the report
    statuses: Counter = field(default_factory=Counter)


def mix(dataset: data.FashionMNIST) -> list[Case]:
    """The request mix: ~70 % good requests of every kind, ~30 % bad ones."""
    images = dataset.test_images[:BATCH]
    raw = {"dataframe_records": [{"pixels": images[0].tolist()}]}
    png_b64 = contract.png_base64(images[1])
    png_bytes = base64.b64decode(png_b64)
    png = {"dataframe_records": [{"image": png_b64}]}
    batch = {"dataframe_records": [{"pixels": img.tolist()} for img in images]}
    wrong_shape = {"dataframe_records": [{"pixels": images[0][:27].tolist()}]}
    not_image = {"dataframe_records": [{"image": base64.b64encode(b"not an image").decode()}]}

    def scoring(body):
        return lambda s, urls: s.post(f"{urls['scoring']}/invocations", json=body, timeout=REQUEST_TIMEOUT_S)

    def ui_json(images_b64):
        return lambda s, urls: s.post(f"{urls['ui']}/predict", json={"images": images_b64}, timeout=REQUEST_TIMEOUT_S)

    def ui_form(s, urls):
        return s.post(f"{urls['ui']}/predict", files=[("files", ("a.png", png_bytes, "image/png"))],
                      timeout=REQUEST_TIMEOUT_S)

    return [
        Case("raw pixels", "scoring", 200, scoring(raw)),
        Case("base64 PNG", "scoring", 200, scoring(png)),
        Case(f"batch of {BATCH}", "scoring", 200, scoring(batch)),
        Case("wrong shape", "scoring", 400, scoring(wrong_shape)),
        Case("not an image", "scoring", 400, scoring(not_image)),
        Case("JSON API PNG", "ui", 200, ui_json([png_b64])),
        Case("form upload", "ui", 200, ui_form),
        Case("JSON API bad", "ui", 400, ui_json(["bm90IGFuIGltYWdl"])),
        Case("raw pixels", "scoring", 200, scoring(raw)),
        Case("JSON API PNG", "ui", 200, ui_json([png_b64])),
    ]


def heaviest_request() -> dict:
    """Images decoding to exactly MAX_REQUEST_PIXELS: one at the per-image limit, the rest in a second one.
    1-bit white PNGs: a few KiB each on the wire, the most decoding a request may cause."""
    def white_png(pixels: int) -> str:
        width = 8000
        image = Image.new("1", (width, pixels // width), 1)
        image.paste(0, (100, 100, width // 2, pixels // width // 2))  # something to find: a garment-sized block
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    first = contract.MAX_IMAGE_PIXELS
    return {"dataframe_records": [{"image": white_png(first)},
                                  {"image": white_png(contract.MAX_REQUEST_PIXELS - first)}]}


def worst_case_mix(dataset: data.FashionMNIST) -> tuple[list[Case], list[Case]]:
    """(the good clients' cases: single images to the scoring server, the heavy clients' one case)."""
    good = [case for case in mix(dataset) if case.target == "scoring" and case.name in ("raw pixels", "base64 PNG")]
    body = heaviest_request()
    heavy = Case("heaviest allowed", "heavy", 200, lambda s, urls: s.post(
        f"{urls['scoring']}/invocations", json=body, timeout=REQUEST_TIMEOUT_S), also_fine=(429,))
    return good, [heavy]


def run_load(scoring_url: str, ui_url: str, dataset: data.FashionMNIST, concurrency: int, duration_s: float,
             pids: dict[str, int], worst_case: bool = False) -> dict:
    """Drive the mix for `duration_s`; returns {target: Tally} plus memory {target: (after warm-up, end)}.
    With `worst_case`, HEAVY_CLIENTS more threads send the heaviest request while the others send good ones."""
    if worst_case:
        good, heavy = worst_case_mix(dataset)
        plans = [good] * concurrency + [heavy] * HEAVY_CLIENTS
        tallies = {"scoring": Tally(), "heavy": Tally()}
    else:
        plans = [mix(dataset)] * concurrency
        tallies = {"scoring": Tally(), "ui": Tally()}
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + duration_s

    def worker(index: int) -> None:
        session = harness.ui_session(ui_url)  # the page's CSRF cookie and token, for the form uploads
        urls = {"scoring": scoring_url, "ui": ui_url}
        cases = plans[index]
        position = index  # threads start at different places in the mix
        while time.perf_counter() < deadline:
            case = cases[position % len(cases)]
            position += 1
            began = time.perf_counter()
            try:
                status = case.send(session, urls).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            elapsed = time.perf_counter() - began
            with lock:
                tally = tallies[case.target]
                tally.statuses[status] += 1
                ok = status == case.expected or status in case.also_fine
                if case.expected == 200:
                    tally.good += 1
                    tally.good_errors += not ok
                    if ok:
                        tally.latencies.append(elapsed)
                else:
                    tally.bad += 1
                    tally.bad_wrong += not ok
                if not ok and len(tally.examples) < 5:
                    tally.examples.append(f"{case.name}: {status}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(plans))]
    for thread in threads:
        thread.start()
    time.sleep(duration_s * WARMUP_FRACTION)
    memory_before = {target: harness.rss_bytes(pid) for target, pid in pids.items()}
    for thread in threads:
        thread.join()
    memory_after = {target: harness.rss_bytes(pid) for target, pid in pids.items()}
    elapsed = time.perf_counter() - start
    return {"tallies": tallies, "elapsed_s": elapsed,
            "memory": {t: (memory_before[t], memory_after[t]) for t in pids if t in tallies}}


def memory_growth(result: dict, target: str) -> float:
    before, after = result["memory"].get(target, (1, 1))
    return (after - before) / before


def p99_s(tally: Tally) -> float:
    return float(np.percentile(tally.latencies, 99)) if tally.latencies else 0.0


def report(result: dict) -> str:
    lines = []
    for target, tally in result["tallies"].items():
        ms = np.array(tally.latencies) * 1000 if tally.latencies else np.zeros(1)
        line = (f"{target:8s} {(tally.good + tally.bad) / result['elapsed_s']:7.1f} req/s | good {tally.good:6d}: "
                f"p50 {np.percentile(ms, 50):6.1f} ms p99 {np.percentile(ms, 99):6.1f} ms, error rate "
                f"{tally.good_errors / max(tally.good, 1):.4f} | bad {tally.bad:5d}, wrong answers {tally.bad_wrong}")
        if target in result["memory"]:
            before, after = result["memory"][target]
            line += (f" | RSS {before / 2**20:6.1f} -> {after / 2**20:6.1f} MiB "
                     f"({100 * memory_growth(result, target):+.1f} %)")
        lines.append(line + f" | statuses {dict(tally.statuses)}")
        lines += [f"         unexpected: {example}" for example in tally.examples]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default=config.PRODUCTION_MODEL_URI,
                        help="model to serve (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help="client threads (default: %(default)s)")
    parser.add_argument("--duration-s", type=float, default=DEFAULT_DURATION_S, help="(default: %(default)s)")
    parser.add_argument("--worst-case", action="store_true",
                        help=f"add {HEAVY_CLIENTS} clients sending the heaviest allowed request (default: off)")
    args = parser.parse_args()
    dataset = data.load(download=False)
    logs = Path(tempfile.mkdtemp(prefix="fmnist-load-"))
    with harness.scoring_and_ui(args.model_uri, harness.child_env(), logs) as (scoring_url, ui_url, scoring, ui):
        print(f"model {args.model_uri}; concurrency {args.concurrency} for {args.duration_s:.0f} s; "
              f"{os.cpu_count()} CPU cores; server logs in {logs}")
        result = run_load(scoring_url, ui_url, dataset, args.concurrency, args.duration_s,
                          {"scoring": scoring.pid, "ui": ui.pid},
                          worst_case=args.worst_case)
    print(report(result))
    failed = [t for t, tally in result["tallies"].items() if tally.good_errors or tally.bad_wrong
              or memory_growth(result, t) > MEMORY_GROWTH_LIMIT]
    if args.worst_case and p99_s(result["tallies"]["scoring"]) > GOOD_P99_LIMIT_S:
        failed.append(f"good requests' p99 over {GOOD_P99_LIMIT_S:g} s")
    print("FAILED: " + ", ".join(failed) if failed else "OK: no errors on good requests, every bad one refused, "
          "memory flat")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
