"""
FineWeb-Edu as prepare.py streams it from the Hugging Face hub: its parquet files listed once (pinned
to a commit) and read one after another from a (file, row) position, so a resumed run or a retry after
a network error reads again at most one row group. Errors a retry may fix (a dropped connection, a
timeout, a server error) are retried with one line each; the others end the run in one line at once.

    check_online()              offline mode, or a hub out of reach: one line before anything is written
    hub_files()                 the dataset's parquet files, in the order streaming reads them
    HubStream(files, shards)    its documents from where the manifest's last shard stopped
    stand_in_files()            a local folder of parquet files read in the hub's place (the tests, offline)
"""

import glob
import os
import sys
import time

from machinery.corpus import check_text_column
from machinery.files import PrepareError, exception_chain, first_line
from machinery.hub import hub_reachable
from machinery.tokens import FINEWEB_EDU

DOWNLOAD_RETRIES, RETRY_PAUSE_S = 5, 10.0  # hub streaming: tries in a row before giving up, pause between them
STAND_IN_ENV = "PREPARE_FINEWEB_EDU_FOLDER"  # names a folder of parquet files read in place of the hub's (tests)


def stand_in_files():
    """The parquet files, sorted, of the folder STAND_IN_ENV names, which stand in for the hub's and are
    read by the same code (the tests' FineWeb-Edu, offline); None when it is not set."""
    folder = os.environ.get(STAND_IN_ENV)
    if not folder:
        return None
    files = sorted(glob.glob(os.path.join(glob.escape(os.path.abspath(folder)), "*.parquet")))
    if not files:
        raise PrepareError(f"{STAND_IN_ENV}={folder!r} names no folder of .parquet files")
    return files


def check_online():
    """Offline mode (HF_HUB_OFFLINE), or a hub whose name does not resolve, is one line at once: no retry
    can fix it, and datasets would only say that it "couldn't reach" the hub after minutes of retries."""
    try:
        import datasets
    except ImportError:
        raise PrepareError("fineweb-edu needs the datasets library: pip install -r requirements.txt") from None
    # (the hub's switch, and datasets' own, HF_DATASETS_OFFLINE)
    switches = (getattr(datasets.config, name, False) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if any(switches):
        raise PrepareError(f"fineweb-edu streams {FINEWEB_EDU[0]} from the Hugging Face Hub, but offline mode is on "
                           "(HF_HUB_OFFLINE): unset it, or prepare a local copy with python prepare.py FOLDER")
    if not hub_reachable():
        raise PrepareError(f"fineweb-edu streams {FINEWEB_EDU[0]} from the Hugging Face Hub, but its host name "
                           "does not resolve (no network?): connect, or prepare a local copy with "
                           "python prepare.py FOLDER")


def hub_files():
    """FineWeb-Edu's parquet files (hf:// paths, pinned to the commit they were listed at), in the order
    `load_dataset(..., streaming=True)` reads them."""
    import datasets

    name, subset = FINEWEB_EDU
    failures = 0
    while True:
        try:  # one listing of the dataset's files (a few small requests): the dataset card says which are the subset's
            return list(datasets.load_dataset_builder(name, subset).config.data_files["train"])
        except Exception as e:  # the hub's errors come from several libraries: retry_or_raise sorts them
            failures += 1
            retry_or_raise(e, failures, f"listing the files of {name} ({subset})")


class HubStream:
    """The documents of a list of parquet files, read file by file from a (file, row) position.

    A file is opened where the stream is, and only the row groups from the one holding that row are read
    (the file's footer says how many rows each holds), so a resumed run, or a retry after a network
    error, reads again at most one row group of one file, not the documents before it. `position` turns
    a document's index in the stream back into the (file, row) to start from, for the manifest."""

    def __init__(self, files, shards):
        self.files = files
        last = shards[-1] if shards else dict(next_document=0, next_file=files[0], next_row=0)
        self.document = last["next_document"]  # index in the stream of the next document to deliver
        if "next_file" in last:
            self.file, self.row = files.index(last["next_file"]), last["next_row"]
        else:  # a manifest of an older prepare.py: from the first file, whole files skipped by their footers
            self.file, self.row = 0, self.document
        self.starts = {}  # file index -> index in the stream of its row 0, for each file opened

    def documents(self):
        """(text, characters, 0) for each document (a whole one: it starts at 0), retrying transient errors
        from where the stream stopped."""
        failures = 0
        while self.file < len(self.files):
            try:
                for text in self.read_file():
                    failures = 0  # progress: the next error gets a full set of tries again
                    yield text, len(text), 0
            except PrepareError:
                raise
            except Exception as e:  # the hub's errors come from several libraries: retry_or_raise sorts them
                failures += 1
                where = f"reading {source_file_name(self.files[self.file])} at row {self.row:,}"
                retry_or_raise(e, failures, where)

    def read_file(self):
        """The texts of the current file from the current row on; the position moves past each one
        before it is handed out, and to the next file at the end."""
        import fsspec  # comes with datasets; opens hf:// paths (huggingface_hub's file system) and local ones
        import pyarrow.parquet as pq

        path = self.files[self.file]
        with fsspec.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            check_text_column(parquet, source_file_name(path))
            self.starts[self.file] = self.document - self.row
            for row, text in parquet_texts(parquet, self.row):
                self.row, self.document = row + 1, self.document + 1
                yield text
            rows = parquet.metadata.num_rows
        self.file, self.row = self.file + 1, max(0, self.row - rows)  # past the end only from an older manifest

    def position(self, document):
        """(file, row) of a document that has been read: the last file opened that starts at or before it."""
        file = max(i for i, start in self.starts.items() if start <= document)
        return self.files[file], document - self.starts[file]


def parquet_texts(parquet, start_row):
    """(row, text) for the rows of a parquet file from start_row on. The row groups before the one that
    holds start_row are skipped unread; each group is read on its own, so memory stays one group."""
    first = 0  # the current row group's first row
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if first + rows <= start_row:
            first += rows
            continue
        for batch in parquet.iter_batches(batch_size=1024, row_groups=[group], columns=["text"]):
            for text in batch.column(0).to_pylist():
                if first >= start_row:
                    yield first, text or ""
                first += 1


def source_file_name(path):
    """A hub file's path in its dataset (sample/10BT/000_00000.parquet), or a local file's name."""
    if path.startswith("hf://") and "@" in path:  # hf://datasets/NAME@COMMIT/PATH
        return path.split("@", 1)[1].split("/", 1)[1]
    return os.path.basename(path)


def retry_or_raise(error, failures, what):
    """After `failures` failures in a row of `what`: pause and return, with one line saying so, when
    another try may help; else raise the one line that ends the run."""
    name, subset = FINEWEB_EDU
    if not is_transient(error):
        raise PrepareError(f"{what}: {first_line(error)}") from None
    if failures >= DOWNLOAD_RETRIES:
        raise PrepareError(f"downloading {name} ({subset}) failed {failures} times: {first_line(error)}") from None
    print(f"\n{what} failed ({type(error).__name__}: {first_line(error)[:100]}); "
          f"retrying in {RETRY_PAUSE_S:.0f} s (try {failures + 1} of {DOWNLOAD_RETRIES})", file=sys.stderr)
    time.sleep(RETRY_PAUSE_S)


def is_transient(error):
    """Whether trying again may help. The root cause decides (the deepest exception of the chain that
    says anything): a dataset card that cannot be fetched is a "not found" caused by a dropped
    connection, and a "couldn't reach the hub" can be caused by offline mode."""
    verdict = False  # an error nothing recognises is not retried: the run continues from here when run again
    for cause in exception_chain(error):
        kind = error_kind(cause)
        verdict = kind if kind is not None else verdict
    return verdict


def error_kind(error):
    """True: transient (a dropped connection, a timeout, a server error, too many requests); False: no
    retry can fix it (offline mode, not found, no permission, a bad value); None: says nothing."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    status = getattr(getattr(error, "response", None), "status_code", None)  # an HTTP error's (hub, httpx, requests)
    if isinstance(error, OfflineModeIsEnabled):
        return False
    if isinstance(status, int):
        return status == 429 or status >= 500
    if isinstance(error, (FileNotFoundError, PermissionError, ValueError)):  # datasets' not-found, an unknown subset
        return False
    if isinstance(error, OSError):  # connection errors, timeouts, broken reads; requests' errors are OSErrors too
        return True
    if any(c.__name__ == "TransportError" for c in type(error).__mro__):  # httpx's (huggingface_hub's client) errors
        return True
    return None
