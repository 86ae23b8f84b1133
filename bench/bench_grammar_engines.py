"""Grammar engines compared on a tokenizer.json: vocabulary setup, compile, first mask, later masks.

    python -m bench.bench_grammar_engines                        # the default model's tokenizer
    python -m bench.bench_grammar_engines --build-big /tmp/big.json   # train a ~116k-token byte-level
                                                                 # BPE on this Python's own sources
    python -m bench.bench_grammar_engines --tokenizer /tmp/big.json --stop 0,2

llguidance is a dependency; xgrammar and outlines-core are measured when installed (they are not
dependencies: see BENCHMARKS.md). Each grammar (a nested JSON schema, a regex, a choice, a small
arithmetic grammar in Lark / GBNF) is compiled, then a valid answer is walked token by token:
the mask is computed at each position and the answer's token checked against it. Times in the
table: setup (vocabulary), compile, the first mask (ms) and the median and 95th percentile of the
later masks (microseconds).
"""
import argparse, glob, json, os, sys, time, statistics
import numpy as np
from tokenizers import Tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--tokenizer", default=os.path.join(os.path.dirname(__file__), "..", "weights", "default", "tokenizer.json"))
ap.add_argument("--stop", default="1,5", help="stop ids, comma separated")
ap.add_argument("--build-big", default=None, help="train a 128k byte-level BPE here and exit")
args = ap.parse_args()
if args.build_big:
    from tokenizers import decoders, models, pre_tokenizers, trainers
    files, total = [], 0
    for f in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "**", "*.py"), recursive=True)):
        try:
            b = open(f, "rb").read(); b.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        files.append(f); total += len(b)
        if total > 60e6:
            break
    big = Tokenizer(models.BPE())
    big.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    big.decoder = decoders.ByteLevel()
    big.train(files, trainers.BpeTrainer(vocab_size=128256, min_frequency=2, show_progress=False,
              special_tokens=["<|endoftext|>", "<|mdm_mask|>", "<|eot_id|>"],
              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    big.save(args.build_big)
    print(f"{big.get_vocab_size()} tokens from {total / 1e6:.0f} MB in {len(files)} files -> {args.build_big}")
    sys.exit(0)
path = args.tokenizer
eos_ids = [int(x) for x in args.stop.split(",")]
tj = open(path).read()
tok = Tokenizer.from_str(tj)
V = tok.get_vocab_size()

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "role", "tags", "address"], "additionalProperties": False}
ANS = {"json": json.dumps({"name": "ada", "age": 36, "role": "admin", "tags": ["x", "yz"], "address": {"city": "paris", "zip": "75001"}}, separators=(",", ":")),
       "regex": "(555) 123-4567", "choice": "banana", "lark": "(1+2)*3"}
REGEX = r"\(\d{3}\) \d{3}-\d{4}"
CHOICES = ["apple", "banana", "cherry"]
LARK = 'start: expr\nexpr: term ("+" term)*\nterm: factor ("*" factor)*\nfactor: /[0-9]+/ | "(" expr ")"\n'
EBNF = 'root ::= expr\nexpr ::= term ("+" term)*\nterm ::= factor ("*" factor)*\nfactor ::= [0-9]+ | "(" expr ")"\n'


def byte_table():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return {chr(c): b for b, c in zip(bs, cs)}

BT = byte_table()
special = set(tok.get_added_tokens_decoder().keys())
vocab_bytes = []
for i in range(V):
    s = tok.id_to_token(i)
    if i in special or s is None:
        vocab_bytes.append(None)
    else:
        vocab_bytes.append(bytes(BT[c] for c in s))


def run(name, setup, compile_, walk):
    t = time.perf_counter(); ctx = setup(); t_setup = time.perf_counter() - t
    for kind in ("json", "regex", "choice", "lark"):
        try:
            t = time.perf_counter(); g = compile_(ctx, kind); tc = time.perf_counter() - t
            ids = tok.encode(ANS[kind]).ids
            times = walk(ctx, g, ids)
            print(f"| {name} | {V} | {t_setup*1e3:.0f} | {kind} | {tc*1e3:.1f} | {times[0]*1e3:.2f} | {statistics.median(times[1:] or times)*1e6:.0f} | {(statistics.quantiles(times[1:], n=20)[-1] if len(times) > 2 else times[-1])*1e6:.0f} |", flush=True)
        except Exception as e:
            print(f"| {name} | {V} | {t_setup*1e3:.0f} | {kind} | failed: {type(e).__name__}: {str(e)[:80]} | | |", flush=True)


# ---- llguidance
import llguidance as llg
from llguidance import LLMatcher, LLTokenizer, grammar_from
def llg_setup():
    return LLTokenizer(tj, eos_token=eos_ids)
def llg_compile(t, kind):
    g = {"json": lambda: grammar_from("json_schema", json.dumps(SCHEMA)), "regex": lambda: grammar_from("regex", REGEX),
         "choice": lambda: grammar_from("choice", json.dumps(CHOICES)), "lark": lambda: grammar_from("lark", LARK)}[kind]()
    m = LLMatcher(t, g, log_level=0)
    assert not m.is_error(), m.get_error()
    return m
def llg_walk(t, m, ids):
    out = []
    for i in ids:
        s = time.perf_counter(); mask = m.compute_bitmask(); out.append(time.perf_counter() - s)
        a = np.frombuffer(mask, dtype=np.uint32); assert (a[i // 32] >> (i % 32)) & 1, (i, m.get_error())
        assert m.consume_token(i), m.get_error()
    s = time.perf_counter(); mask = m.compute_bitmask(); out.append(time.perf_counter() - s)
    assert m.is_accepting()
    return out

print("| engine | vocabulary | setup ms | grammar | compile ms | first mask ms | mask us (median) | mask us (p95) |")
print("|---|---|---|---|---|---|---|---|")
run("llguidance", llg_setup, llg_compile, llg_walk)
try:
    import xgrammar as xgr
except ImportError:
    xgr = None
def xgr_setup():
    enc = [b if b is not None else (tok.id_to_token(i) or "").encode() for i, b in enumerate(vocab_bytes)]
    info = xgr.TokenizerInfo(enc, xgr.VocabType.RAW, vocab_size=V, stop_token_ids=eos_ids)
    return xgr.GrammarCompiler(info, cache_enabled=False)
def xgr_compile(c, kind):
    if kind == "json": return c.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    if kind == "regex": return c.compile_regex(REGEX)
    if kind == "choice": return c.compile_grammar("root ::= " + " | ".join(json.dumps(x) for x in CHOICES))
    return c.compile_grammar(EBNF)
def xgr_walk(c, g, ids):
    m = xgr.GrammarMatcher(g); bm = xgr.allocate_token_bitmask(1, V); out = []
    for i in ids:
        s = time.perf_counter(); m.fill_next_token_bitmask(bm); out.append(time.perf_counter() - s)
        assert (int(bm[0, i // 32]) >> (i % 32)) & 1
        assert m.accept_token(i)
    s = time.perf_counter(); m.fill_next_token_bitmask(bm); out.append(time.perf_counter() - s)
    return out
if xgr is not None:
    run("xgrammar", xgr_setup, xgr_compile, xgr_walk)

# ---- outlines-core
try:
    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema
except ImportError:
    oc = None
def oc_setup():
    m = {}
    for i, b in enumerate(vocab_bytes):
        if b is not None and i not in eos_ids:
            m.setdefault(b, []).append(i)
    return oc.Vocabulary(eos_ids[0], m)
def oc_compile(v, kind):
    if kind == "json": rx = build_regex_from_schema(json.dumps(SCHEMA))
    elif kind == "regex": rx = REGEX
    elif kind == "choice": rx = "(apple|banana|cherry)"
    else: raise NotImplementedError("outlines-core has no context-free grammars")
    return oc.Index(rx, v)
def oc_walk(v, idx, ids):
    g = oc.Guide(idx); out = []
    for i in ids:
        s = time.perf_counter(); allowed = g.get_tokens(); out.append(time.perf_counter() - s)
        g.advance(i)
    return out
if oc is not None:
    run("outlines-core", oc_setup, oc_compile, oc_walk)
