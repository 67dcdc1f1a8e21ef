"""
A local corpus as prepare.py reads it: a stream of documents from a .txt file or a folder of .txt,
.jsonl and .parquet files, and a fingerprint that says whether the files changed since.

    local_files(source)                   the source's files, in the order their documents are read
    local_documents(files, skip, byte)    the documents after the first `skip`, in pieces (text, bytes, at)
    source_fingerprint(source, files)     each file's name, size and mtime_ns: taken without reading a file
    unchanged_files, documents_in         how far a changed source is the same (a resume may go on past it)

A row of a .parquet file and a line of a .jsonl file (its "text") are each one document; a .txt file
is one document, read in pieces of about PIECE_BYTES cut where the pieces' tokens are exactly the
whole text's (safe_cut), so a big one is held in memory a few pieces at a time and a resumed run can
start at the byte where one of its pieces begins.
"""

import codecs
import json
import os
import re

from machinery.files import PrepareError, first_line

PIECE_BYTES = 1 << 20  # a .txt document is read and tokenized in pieces of about this size (safe_cut)


SOURCE_TYPES = (".txt", ".jsonl", ".parquet")  # what a folder source's files may be


def local_files(source):
    """The files that make up a local source, in the order their documents are read: the file, or the
    folder's source files in sorted order. A file that two links (or a link and its own name) reach is
    read once, under the name that sorts first."""
    if os.path.isfile(source):
        return [source]
    if os.path.exists(source) and not os.path.isdir(source):
        raise PrepareError(f"source {source!r} is not a regular file (a pipe or a device?): give a .txt file, a "
                           "folder, or fineweb-edu")
    if not os.path.isdir(source):
        raise PrepareError(f"source {source!r} not found (a .txt file, a folder, or fineweb-edu)")
    files, seen = [], set()
    for path in sorted(folder_files(source)):
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            files.append(path)
    if not files:
        raise PrepareError(f"folder {source!r} has no .txt, .jsonl or .parquet files")
    return files


def folder_files(folder):
    """The source files in a folder and its subfolders (a folder named like a file, "sub.txt", is walked
    as a folder). Links are followed, but each real folder is walked once: a link to a folder above it
    would loop. Hidden files and folders (named ".something") are left out, as a shell's * leaves them
    out. A link to nothing is refused: the corpus would silently lack a file."""
    walked = {os.path.realpath(folder)}
    for top, folders, names in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(folders):  # (os.walk descends into what is left in `folders`)
            real = os.path.realpath(os.path.join(top, name))
            if not name.startswith(".") and real not in walked:
                walked.add(real)
                kept.append(name)
        folders[:] = kept
        for name in names:
            path = os.path.join(top, name)
            if name.startswith(".") or not name.endswith(SOURCE_TYPES):
                continue
            if not os.path.exists(path):  # (os.walk lists a link to nothing among the files)
                raise PrepareError(f"{path!r} is a link to {os.readlink(path)!r}, which does not exist: "
                                   "remove the link or restore its file")
            if not os.path.isfile(path):
                raise PrepareError(f"{path!r} is not a regular file (a pipe or a device?): move it out of the folder")
            yield path


def source_fingerprint(source, files):
    """[name, size, mtime_ns] of each file of a local source, the name relative to the folder (a file
    source: its own name). An edited, added, removed or renamed file changes it, and taking it reads no
    file: a resumed run, or a repeat on a finished out_dir, compares it with the manifest's."""
    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    return [file_fingerprint(path, folder) for path in files]


def file_fingerprint(path, folder):
    stat = os.stat(path)  # (a link's: its file's size and time)
    return [os.path.relpath(path, folder), stat.st_size, stat.st_mtime_ns]


def unchanged_files(recorded, now):
    """How many of the source's files, from the first on, are as a fingerprint recorded them."""
    differ = (i for i, (then, today) in enumerate(zip(recorded, now)) if then != today)
    return next(differ, min(len(recorded), len(now)))


def documents_in(files):
    """How many documents `files` hold, counted by reading them (a .txt file is one)."""
    return sum(sum(1 for _ in read_documents(path)) if path.endswith((".parquet", ".jsonl")) else 1 for path in files)


def read_documents(path, start=0):
    """The documents of one file in pieces: (text, bytes read, where the text starts in its document, in
    bytes: 0 begins a document). A row or a line is a whole document; a text file is one document, read
    from byte `start` (0, or where one of its pieces begins) in pieces (text_pieces)."""
    if path.endswith(".parquet"):
        for text, n_bytes in read_parquet(path):
            yield text, n_bytes, 0
    elif path.endswith(".jsonl"):
        for text, n_bytes in read_jsonl(path):
            yield text, n_bytes, 0
    else:
        yield from text_pieces(path, start)


def read_jsonl(path):
    """(text, bytes) of each line of a .jsonl file that is not blank (jsonl_text). Lines end at "\n" (a
    "\r" before it is JSON's whitespace); a byte-order mark at the start, which some editors write, is
    skipped."""
    with open(path, "rb") as f:
        at = 0  # the first byte in the file of the line's text
        for line_number, line in enumerate(f, 1):
            if line_number == 1 and line.startswith(codecs.BOM_UTF8):
                line, at = line[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PrepareError(f"{path!r} is not UTF-8 text (line {line_number}, byte {at + e.start}: "
                                   f"{e.reason})") from None
            at += len(line)
            if text.strip():
                yield jsonl_text(text, path, line_number), len(line)


# A place to cut a text: a whitespace character (ASCII) before one that is not whitespace: an ASCII one
# from "!" to "~", or any other but Unicode's other spaces, U+0085, U+00A0, U+1680, U+2000 to U+200A,
# U+2028, U+2029, U+202F, U+205F and U+3000 (in UTF-8: C2 85, C2 A0, E1 9A 80, E2 80 80-8A, A8, A9, AF,
# E2 81 9F and E3 80 80). So Japanese lines that begin with kana (E3 ...) can be cut before, too.
# (Those are whole characters: a cut before the last bytes read waits for what follows them.)
CUT = re.compile(rb"[\t\n\x0b\x0c\r ](?=[!-~\xc3-\xe0\xe4-\xf4]|\xc2[^\x85\xa0]|\xe1(?!\x9a\x80)..|\xe3(?!\x80\x80)..|"
                 rb"\xe2(?!\x80[\x80-\x8a\xa8\xa9\xaf]|\x81\x9f)..)", re.DOTALL)


def safe_cut(data, since=1):
    r"""Where UTF-8 `data` can be cut so that the two sides' tokens, one after the other, are the whole's:
    before its last whitespace character that precedes a non-whitespace one (CUT; not at 0, which would
    leave an empty piece), at `since` or after. None if it has no such place.

    Why that is exact: GPT-2's pre-tokenizer (tiktoken's r50k pattern, which has no look-behind) splits
    the text into pre-tokens, and BPE merges only within one. Whitespace followed by a non-whitespace
    character is in one pre-token only as the one space a word, number or punctuation may take in front,
    and a run of whitespace before a non-whitespace character leaves its last one to what follows
    (\s+(?!\S)), so a pre-token starts at the cut, and from there on the text is the same. Before the
    cut the pre-tokens are the same when the text ends there: each stops at the cut either way, a run of
    whitespace just before it included (\s++$ takes at the end of the text what \s+(?!\S) takes when it
    goes on). A cut after the whole run is not exact: "a\n\n" ends in one pre-token, "\n\n", where
    "a\n\nb" has two, "\n" and "\n"."""
    window = 1 << 16  # the last place is near the end: look there first
    while True:
        start = max(since, len(data) - window)
        places = [m.start() for m in CUT.finditer(data, start)]
        if places:
            return places[-1]
        if start == since:
            return None
        window *= 16


def text_pieces(path, start=0):
    """A text file, one document, from byte `start` on, in pieces: (text, bytes, its first byte in the
    file). Each piece is the PIECE_BYTES from its first byte, cut back by safe_cut (a stretch with nowhere
    to cut is read on until there is one), so memory stays about one piece, the pieces' tokens are the
    whole text's, and where the pieces begin depends only on the file: a resumed run reading from one
    of them cuts the rest where the first run did."""
    with open(path, "rb") as f:
        at = start
        while True:
            f.seek(at)
            data, since = bytearray(f.read(PIECE_BYTES)), 1  # (a bytearray grows in place: no copy a read)
            while (cut := safe_cut(data, since)) is None and (more := f.read(PIECE_BYTES)):
                since = max(1, len(data) - 3)  # only what is new is searched (a place's look-ahead: 3 bytes)
                data += more
            if cut is None:  # the end of the file: the rest is the last piece (an empty file, an empty document)
                if data or at == 0:
                    yield utf8_text(data, path, at), len(data), at
                return
            yield utf8_text(data[:cut], path, at), cut, at
            at += cut


def utf8_text(data, path, at):
    """`data`, bytes of `path` from byte `at`, as text (a cut by safe_cut falls between two characters)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path!r} is not UTF-8 text (byte {at + e.start}: {e.reason})") from None


def jsonl_text(line, path, line_number):
    """The "text" of a line of a .jsonl file. A null text is an empty document, as a parquet file's null is
    (read_parquet): both say that the record has no text."""
    try:
        record = json.loads(line)
    except ValueError as e:
        raise PrepareError(f"{path}:{line_number} is not JSON: {first_line(e)}") from None
    text = record.get("text", False) if isinstance(record, dict) else False  # (False: no "text" field)
    if not (text is None or isinstance(text, str)):
        raise PrepareError(f"{path}:{line_number} has no \"text\" string field")
    return text or ""


def read_parquet(path):
    """(text, bytes) of each row of a parquet file's text column; a null is an empty document. The bytes
    are the row's share of the file's size: its text is compressed there, and the progress bar's total
    is the files' sizes (counted in text, a file's rows would pass it, and the bar would lose its ETA)."""
    import pyarrow.parquet as pq  # comes with datasets; only parquet sources need it

    try:
        table = pq.ParquetFile(path)
        check_text_column(table, path)
        rows, size, row = table.metadata.num_rows, os.path.getsize(path), 0
        for batch in table.iter_batches(columns=["text"], batch_size=1024):
            for text in batch.column(0).to_pylist():
                row += 1
                yield text or "", row * size // rows - (row - 1) * size // rows  # (the rows' shares add up to size)
    except (PrepareError, FileNotFoundError):
        raise
    except Exception as e:  # pyarrow's own errors: not a parquet file, truncated, ...
        raise PrepareError(f"{path!r} is not a readable parquet file: {first_line(e)}") from None


def check_text_column(parquet, path):
    """A parquet file's documents are its `text` column, which must hold strings (a null: no text)."""
    import pyarrow as pa

    names = parquet.schema_arrow.names
    if "text" not in names:
        raise PrepareError(f"{path!r} has no 'text' column (columns: {', '.join(names)})")
    kind = parquet.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise PrepareError(f"{path!r} has a 'text' column of {kind}, not of strings")


def local_documents(files, skip, byte=0):
    """Every document of `files` after the first `skip`, in pieces (read_documents); the first one from
    `byte` on (where one of the pieces of a text file begins). What an earlier run did comes as
    (None, its bytes, 0): not tokenized again, only counted, so a resumed run's progress bar starts
    where the last one stopped. A file removed meanwhile is one line."""
    try:
        yield from documents_after(files, skip, byte)
    except FileNotFoundError as e:
        gone = repr(e.filename) if e.filename else next((repr(f) for f in files if not os.path.exists(f)), "a file")
        raise PrepareError(f"{gone} was removed while the source was read: its shards cannot be finished; prepare "
                           "the source again into a new --out_dir") from None


def documents_after(files, skip, byte):
    """local_documents' pieces, read (or, the first `skip` documents, only counted) file by file. A place
    to start that the files do not have (a manifest edited, or another source's) is one line."""
    seen = 0
    for path in files:
        if not path.endswith((".parquet", ".jsonl")):  # a text file, one document: skipped unread
            seen += 1
            start = byte if seen == skip + 1 else 0
            if start and start >= os.path.getsize(path):
                raise PrepareError(no_such_place(skip, byte))
            if seen <= skip or start:
                yield None, os.path.getsize(path) if seen <= skip else start, 0
            if seen > skip:
                yield from read_documents(path, start)
            continue
        for text, n_bytes, at in read_documents(path):
            seen += 1
            if byte and seen == skip + 1:  # (a place inside a document is a byte of a text file)
                raise PrepareError(no_such_place(skip, byte))
            yield (text if seen > skip else None), n_bytes, at
    if seen < skip + (byte > 0):
        raise PrepareError(no_such_place(skip, byte))


def no_such_place(skip, byte):
    at = f"next_document {skip:,}" + (f", next_byte {byte:,}" if byte else "")
    return (f"the manifest's last shard goes on at {at}, a place the source does not have: delete its --out_dir "
            "to prepare it again")
