"""Read a benchmark from its official distribution into manifests with the official splits.

    python tools/prepare_benchmark.py resisc45 --archive NWPU-RESISC45.zip \
        --split_file resisc45-train.txt resisc45-val.txt resisc45-test.txt
    python tools/prepare_benchmark.py potsdam --archive Potsdam.zip            # or the folder holding its zips
    python tools/prepare_benchmark.py loveda --archive Train.zip Val.zip
    python tools/prepare_benchmark.py --list                                   # data sets, archives, URLs, md5s

``--archive`` takes the files as published (``.zip``, ``.tar``, ``.tar.gz`` ...; zips inside zips are opened) or a
folder they were unpacked into (``.rar`` / ``.7z`` archives must be unpacked first). Archives with a published md5 are
verified before reading (``--no_verify`` skips it). The output folder (default ``$BENCHMARK_ROOT/NAME``,
``BENCHMARK_ROOT`` defaulting to ``data/benchmarks``) gets ``<split set>-<split>.csv`` manifests (classification:
``label,path,class_name``; segmentation: ``image_path,mask_path``; paths relative to the CSV) and ``summary.json``
(counts per split and class beside the published ones, sources, protocol flags). Images inside archives are extracted
under ``OUTPUT/images``; images in a folder are used where they are unless ``--copy``. ISPRS tiles are cut into
512 x 512 training crops and whole test tiles with class-index masks. Every file is written atomically and a rerun
skips what is done, so an interrupted run resumes. ``docs/reproducing.md`` lists each data set's layout and sources.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.config import HelpFormatter, summary
from util.data.archives import Source, verify_checksums
from util.data.benchmarks import BENCHMARKS, prepare, published_count_problems
from util.errors import UsageError

DEFAULT_ROOT = "data/benchmarks"


def benchmark_root() -> Path:
    """``$BENCHMARK_ROOT``, else ``data/benchmarks`` (relative to the working folder)."""
    return Path(os.environ.get("BENCHMARK_ROOT") or DEFAULT_ROOT)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=summary(__doc__), formatter_class=HelpFormatter)
    parser.add_argument(
        "name",
        nargs="?",
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help=f"the benchmark: {', '.join(sorted(BENCHMARKS))}",
    )
    parser.add_argument(
        "--archive",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="the official archive file(s), or the folder(s) they were unpacked into",
    )
    parser.add_argument("--output", type=Path, default=None, help="manifest folder (default: $BENCHMARK_ROOT/NAME)")
    parser.add_argument(
        "--split_file",
        nargs="+",
        type=Path,
        default=[],
        metavar="PATH",
        help="split lists the user supplies (torchgeo's <name>-{train,val,test}.txt; see --list)",
    )
    parser.add_argument(
        "--no_verify", action="store_true", help="do not check archives and split lists against their published md5s"
    )
    parser.add_argument(
        "--copy",
        action="store_true",
        help="copy images out of an unpacked folder too (default: the manifests point at them there)",
    )
    parser.add_argument("--list", action="store_true", help="print every benchmark's distribution and splits, and exit")
    return parser


def describe() -> str:
    lines = []
    for bench in BENCHMARKS.values():
        lines += [f"{bench.name}: {bench.title} ({bench.task}; {bench.homepage})", f"  layout: {bench.layout}"]
        lines += [f"  archive {a.name}: {a.url}; md5 {a.md5 or '-'} ({a.checksum_source})" for a in bench.archives]
        lines += [f"  split set {s.name} (results on {s.evaluation}): {s.source}" for s in bench.split_sets]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    if args.list:
        print(describe())
        return
    if args.name is None or not args.archive:
        raise UsageError("give NAME and --archive PATH (or --list)")
    bench = BENCHMARKS[args.name]
    output = args.output or benchmark_root() / bench.name
    cache = output / ".cache"
    published = {} if args.no_verify else bench.published_md5s
    state = output / ".verified.json"
    given_files = [p for p in args.archive if p.is_file()]
    notes = verify_checksums(given_files, published, state) if published else []  # before reading what is inside
    source = Source(args.archive, cache, exclude=[output])
    if published:
        notes += verify_checksums([p for p in source.archive_files if p not in given_files], published, state)
    elif not args.no_verify:
        notes.append(f"{bench.name}: no checksum is published for its archives; not verified")
    else:
        notes.append("--no_verify: checksums not verified")
    summary = prepare(
        bench,
        source,
        output,
        args.split_file,
        in_place=not args.copy,
        verify_lists=not args.no_verify,
        checksum_notes=notes,
    )
    shutil.rmtree(cache, ignore_errors=True)  # copies of inner archives and tiles: only needed until done
    for note in notes + summary["notes"]:
        print(f"note: {note}")
    for name, split_set in summary["split_sets"].items():
        counts = ", ".join(f"{split} {c['images']}" for split, c in split_set["counts"].items())
        print(f"{bench.name} {name}: {counts} ({', '.join(split_set['manifests'].values())})")
    for problem in published_count_problems(summary):
        print(
            f"warning: {bench.name}: {problem}; benchmarks/paper.py will say its numbers are not comparable with "
            "the published ones",
            file=sys.stderr,
        )
    print(f"manifests and summary.json: {output}")


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()  # --help answers here, before torch loads
    from util.run.process import run_entry_point

    run_entry_point(main, arguments)
