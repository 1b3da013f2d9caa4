"""Fetching the paper's data: datasets.zip downloaded (or copied) and unpacked into the data folder, all or nothing.

run.py calls fetch_data when --data_dir is missing (with --download, or after asking); data_utils reads what it
unpacked.
"""

import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from data_utils import DATA_URL, DATASETS, DataError


def _download(url: str, target: Path) -> None:
    """Copy a URL (or local path) to target with a progress bar."""
    source = url if "://" in url else Path(url).resolve().as_uri()
    with urllib.request.urlopen(source, timeout=60) as response, open(target, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc="datasets.zip") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def source_folders(name: str) -> set[str]:
    """The <name>/ folders a dataset reads (asdiv: svamp's too)."""
    spec = DATASETS[name]
    return {source for split in spec.splits for source in spec.sources.get(split, (name,))}


def fetch_data(url: str, data_dir: Path, ask: bool, dataset: str | None = None) -> None:
    """Fetch and unpack datasets.zip into data_dir, all or nothing: unpack beside it, check that it holds the paper's
    <name>/ folders (and `dataset`'s, when given), then rename into place."""
    manual = (
        f"data folder {data_dir} not found: download {DATA_URL}, unzip it and pass the 'datasets' folder as "
        "--data_dir (or run again with --download)"
    )
    if ask:
        if not sys.stdin.isatty():
            raise DataError(manual)
        answer = input(f"{data_dir} does not exist. Download and unpack the paper's data from {url}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise DataError(manual)
    parent = data_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".datasets-download-") as tmp:
        archive = Path(tmp) / "datasets.zip"
        try:
            _download(url, archive)
        except (OSError, ValueError) as e:
            raise DataError(f"could not fetch {url} ({e}); {manual}") from None
        try:
            with zipfile.ZipFile(archive) as zf:
                broken = zf.testzip()
                if broken is not None:
                    raise DataError(f"{url}: archive member {broken} is corrupt; download it again")
                unpacked = Path(tmp) / "unpacked"
                for member in zf.namelist():
                    if member.startswith("/") or ".." in Path(member).parts:
                        raise DataError(f"{url}: archive member {member!r} would unpack outside the data folder")
                zf.extractall(unpacked)
        except zipfile.BadZipFile:
            raise DataError(f"{url} is not a zip archive; download {DATA_URL} by hand") from None
        # The repository's copy unpacks to datasets/<name>/; a re-zipped one may hold the <name>/ folders directly.
        root = unpacked / "datasets" if (unpacked / "datasets").is_dir() else unpacked
        paper = [name for name, spec in DATASETS.items() if spec.from_paper]
        found = [name for name in paper if (root / name).is_dir()]
        if not found:
            raise DataError(f"{url} holds none of the folders {', '.join(paper)}; is it the paper's datasets.zip?")
        missing = sorted(source_folders(dataset) - set(found)) if dataset else []
        if missing:
            raise DataError(f"{url} holds {', '.join(found)} but not {', '.join(m + '/' for m in missing)}, which "
                            f"--dataset {dataset} reads; is it the whole datasets.zip?")
        shutil.rmtree(root / "__MACOSX", ignore_errors=True)
        os.replace(root, data_dir)
    print(f"unpacked {', '.join(found)} into {data_dir}", file=sys.stderr)
