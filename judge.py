"""Judge needle results twice: by rule (RULER string_match_all) and by an LLM judge in
Prometheus-Eval's format over any OpenAI-compatible endpoint, then measure how often they agree.

    python judge.py --input=results/needle_tiny.json --judge_url=http://localhost:8000/v1
    JUDGE_API_KEY=... python judge.py --input=... --judge_url=https://api.openai.com/v1 --judge_model=gpt-4o --repetition_penalty=1

The prompts are Prometheus-Eval's (prometheus-eval/prometheus-eval, prompts.py) word for word:
prometheus-7b-v2.0 was trained on exactly this text, so any rewording costs accuracy. The judge
sees the question only, never the haystack: it grades the answer against the reference values,
not the retrieval (that is the model's job, and a 1M-token haystack would not fit the judge).
"""
import http.client
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields  # noqa: F401  (judge.fields: the tests list the flags)

import model as M


@dataclass
class JudgeConfig:
    input: str = ""                 # needle results JSON written by needle.py (required)
    out: str = ""                   # output JSON; default results/judge_<input stem>.json
    judge_url: str = "http://localhost:8000/v1"  # OpenAI-compatible base URL (with /v1)
    judge_model: str = ""           # model name; empty: the first id from GET {judge_url}/models
    reference: bool = True          # show the reference answer (the needle values) to the judge
    rubric: str = "needle"          # "needle" (built in) or a path to a text file in rubric format
    merge_system: bool = False      # fold the system prompt into the user turn (chat templates without a system role, e.g. Mistral's)
    temperature: float = 1.0        # sampling defaults are prometheus-eval's (its retries rely on sampling)
    top_p: float = 0.9              # nucleus sampling
    max_tokens: int = 1024          # per judge reply (feedback + verdict)
    repetition_penalty: float = 1.03  # a vLLM extension; 1 omits it (api.openai.com rejects unknown fields)
    retries: int = 3                # extra attempts per sample on unparseable output or a transient HTTP error
    backoff: float = 0.5            # seconds before the first retry after an HTTP error; doubles, max 8 s
    timeout: float = 120.0          # seconds per HTTP request
    concurrency: int = 8            # requests in flight (threads)
    limit: int = 0                  # judge only the first N samples (0: all)


# ----------------------------------------------------------------------------- prompts
# Verbatim from prometheus-eval (ABS_SYSTEM_PROMPT, ABSOLUTE_PROMPT[_WO_REF], REL_SYSTEM_PROMPT,
# RELATIVE_PROMPT[_WO_REF]), including their grammar: the judge model was trained on these strings.
ABS_SYSTEM = ("You are a fair judge assistant tasked with providing clear, objective feedback based on "
              "specific criteria, ensuring each assessment reflects the absolute standards set for performance.")
REL_SYSTEM = ("You are a fair judge assistant assigned to deliver insightful feedback that compares individual "
              "performances, highlighting how each stands relative to others within the same cohort.")

_STEPS_ABS = """1. Write a detailed feedback that assess the quality of the response strictly based on the given score rubric, not evaluating in general.
2. After writing a feedback, write a score that is an integer between 1 and 5. You should refer to the score rubric.
3. The output format should look as follows: "(write a feedback for criteria) [RESULT] (an integer number between 1 and 5)"
4. Please do not generate any other opening, closing, and explanations."""

_STEPS_REL = """1. Write a detailed feedback that assess the quality of two responses strictly based on the given score rubric, not evaluating in general.
2. After writing a feedback, choose a better response between Response A and Response B. You should refer to the score rubric.
3. The output format should look as follows: "(write a feedback for criteria) [RESULT] (A or B)"
4. Please do not generate any other opening, closing, and explanations."""


def absolute_prompt(instruction, response, rubric, reference=None):
    """Prometheus absolute grading (1-5) of one response; with a reference answer when given."""
    given = ("a response to evaluate, a reference answer that gets a score of 5, and a score rubric"
             if reference is not None else "a response to evaluate, and a score rubric")
    parts = [
        ("Task Description", f"An instruction (might include an Input inside it), {given} "
                             f"representing a evaluation criteria are given.\n{_STEPS_ABS}"),
        ("The instruction to evaluate", instruction),
        ("Response to evaluate", response),
        ("Reference Answer (Score 5)", reference),
        ("Score Rubrics", rubric),
    ]
    return _sections(parts)


def relative_prompt(instruction, response_a, response_b, rubric, reference=None):
    """Prometheus relative grading (A or B); prometheus-eval passes only the rubric's first line
    (the criteria) here, e.g. rubric.split("\\n")[0]."""
    given = ("a response to evaluate, a reference answer, and a score rubric"
             if reference is not None else "a response to evaluate, and a score rubric")
    parts = [
        ("Task Description", f"An instruction (might include an Input inside it), {given} "
                             f"representing a evaluation criteria are given.\n{_STEPS_REL}"),
        ("Instruction", instruction),
        ("Response A", response_a),
        ("Response B", response_b),
        ("Reference Answer", reference),
        ("Score Rubric", rubric),
    ]
    return _sections(parts)


def _sections(parts):
    body = "".join(f"###{head}:\n{text}\n\n" for head, text in parts if text is not None)
    return body + "###Feedback: "  # the trailing space is in the original and in the training data


def make_rubric(criteria, *descriptions):
    """prometheus-eval's SCORE_RUBRIC_TEMPLATE: '[criteria]' then 'Score k: ...' for k = 1..5."""
    assert len(descriptions) == 5, "a rubric has five score descriptions"
    return "\n".join([f"[{criteria}]"] + [f"Score {k}: {d}" for k, d in enumerate(descriptions, 1)])


# Needle retrieval: correctness first (the rule's question), then how cleanly it is stated, so that
# scores 4-5 mean "all requested values, nothing wrong" and agreement with the rule is meaningful.
NEEDLE_RUBRIC = make_rubric(
    "Does the response give exactly the special magic number(s) that the instruction asks for, as in the reference answer?",
    "The response contains none of the requested numbers: it is empty, off-topic, or gives only wrong numbers "
    "(for example the number of a different key).",
    "The response contains fewer than half of the requested numbers, or the right number only buried among several wrong ones.",
    "The response contains about half of the requested numbers, or all of them mixed with wrong numbers presented as answers.",
    "The response contains all requested numbers and no wrong one, with minor defects such as repetition, "
    "formatting noise or an irrelevant remark.",
    "The response states all requested numbers exactly and nothing else that is wrong, as in the reference answer.",
)


# ----------------------------------------------------------------------------- parsing
# Prometheus asks for "(feedback) [RESULT] N". The verdict is the LAST [RESULT] (feedback text often
# quotes scores: "a score of 2 would be too harsh ... [RESULT] 4"); prometheus-eval's own regex takes
# the first "score of N" and would read 2 there. Without any [RESULT] N we accept the last
# "Score: N" (some judges write it that way). A number outside 1..5 or not an integer is no verdict.
_NUM = r"[(\[]?\s*([-+]?\d+(?:\.\d+)?)"
_RESULT_RE = re.compile(r"\[RESULT\]\s*:?\s*" + _NUM, re.IGNORECASE)
_SCORE_RE = re.compile(r"\bScore\s*:\s*" + _NUM, re.IGNORECASE)  # not "Score 3:" (the rubric's own lines)
_RESULT_AB_RE = re.compile(r"\[RESULT\]\s*:?\s*[(\[]?\s*(A|B)\b", re.IGNORECASE)


def parse_absolute(text):
    """-> int in 1..5, or None when the output holds no valid verdict."""
    if not text:
        return None
    found = _RESULT_RE.findall(text) or _SCORE_RE.findall(text)
    if not found:
        return None
    n = found[-1]
    if not n.lstrip("+-").isdigit():
        return None  # "4.5": not an integer verdict
    n = int(n)
    return n if 1 <= n <= 5 else None


def parse_relative(text):
    """-> "A", "B", or None: the last [RESULT] A|B."""
    found = _RESULT_AB_RE.findall(text or "")
    return found[-1].upper() if found else None


# ----------------------------------------------------------------------------- the rule and agreement
def string_match_all(prediction, values):
    """RULER's string_match_all: the fraction of reference values found in the prediction, case-insensitive.
    needle.score must equal this function (test_judge_rule_matches_needle holds them together); it
    lives here too so that judge.py reads results without needle.py."""
    p = prediction.lower()
    return sum(v.lower() in p for v in values) / len(values)


def cohen_kappa(a, b):
    """Cohen's kappa of two equally long binary label lists; None when undefined (chance agreement 1)."""
    n = len(a)
    if n == 0:
        return None
    po = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    return None if pe == 1 else (po - pe) / (1 - pe)


def agreement(rule_scores, llm_scores):
    """Accuracy and kappa of (LLM score >= 4) against (rule score == 1), over samples the judge scored."""
    pairs = [(r == 1.0, s >= 4) for r, s in zip(rule_scores, llm_scores) if s is not None]
    rule, llm = [p[0] for p in pairs], [p[1] for p in pairs]
    n = len(pairs)
    return {
        "n": n,
        "accuracy": sum(x == y for x, y in pairs) / n if n else None,
        "kappa": cohen_kappa(llm, rule),
        # rows: rule says correct / wrong; columns: the judge says >= 4 / < 4
        "confusion": {"rule1_llm_hi": sum(r and l for r, l in pairs), "rule1_llm_lo": sum(r and not l for r, l in pairs),
                      "rule0_llm_hi": sum(l and not r for r, l in pairs), "rule0_llm_lo": sum(not r and not l for r, l in pairs)},
    }


# ----------------------------------------------------------------------------- the client
# Plain urllib rather than the openai package: no dependency for a client script, one POST per
# attempt, and the retry policy is ours alone (the openai client retries 429/5xx itself, which
# would hide attempts and multiply timeouts).
class HTTPFailure(Exception):
    def __init__(self, msg, retryable):
        super().__init__(msg)
        self.retryable = retryable


def _api_key():
    return os.environ.get("JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")


def _request(url, payload, timeout):
    headers = {"Content-Type": "application/json"}
    if _api_key():
        headers["Authorization"] = f"Bearer {_api_key()}"
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()[:300].decode(errors="replace")
        raise HTTPFailure(f"HTTP {e.code} from {url}: {body}", retryable=e.code in (408, 429) or e.code >= 500)
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
        raise HTTPFailure(f"{url}: {getattr(e, 'reason', e)}", retryable=True)
    except json.JSONDecodeError as e:
        raise HTTPFailure(f"{url}: reply is not JSON ({e})", retryable=True)


def first_model(cfg):
    reply = _request(cfg.judge_url.rstrip("/") + "/models", None, cfg.timeout)
    return reply["data"][0]["id"]


def chat(cfg, model, prompt, system):
    messages = ([{"role": "user", "content": f"{system}\n\n{prompt}"}] if cfg.merge_system else
                [{"role": "system", "content": system}, {"role": "user", "content": prompt}])
    payload = {"model": model, "messages": messages, "temperature": cfg.temperature, "top_p": cfg.top_p,
               "max_tokens": cfg.max_tokens}
    if cfg.repetition_penalty != 1.0:
        payload["repetition_penalty"] = cfg.repetition_penalty
    reply = _request(cfg.judge_url.rstrip("/") + "/chat/completions", payload, cfg.timeout)
    try:
        return reply["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise HTTPFailure(f"no choices[0].message.content in the reply: {str(reply)[:200]}", retryable=True)


def judge_one(cfg, model, rubric, sample):
    """Grade one answer: up to 1 + cfg.retries attempts; returns the score (or None) and the evidence."""
    reference = ", ".join(sample["values"]) if cfg.reference else None
    prompt = absolute_prompt(sample["question"], sample["prediction"], rubric, reference)
    output, errors, replies = None, [], 0  # errors: every HTTP failure on the way, also when a retry succeeded
    for attempt in range(1, cfg.retries + 2):
        try:
            output = chat(cfg, model, prompt, ABS_SYSTEM)
            replies += 1
        except HTTPFailure as e:
            errors.append(str(e))
            if not e.retryable:  # 400, 401, 404...: asking again gets the same answer
                break
            if attempt <= cfg.retries:
                time.sleep(min(cfg.backoff * 2 ** (attempt - 1), 8.0))
            continue
        score = parse_absolute(output)
        if score is not None:
            return {"llm_score": score, "judge_output": output, "attempts": attempt, "replies": replies, "errors": errors}
    return {"llm_score": None, "judge_output": output, "attempts": attempt, "replies": replies, "errors": errors}


def judge_all(cfg, model, rubric, samples):
    """All samples with cfg.concurrency threads; a progress line on stderr about every 5%."""
    done, lock, t0 = [0, 0], threading.Lock(), time.time()
    every = max(1, len(samples) // 20)

    def work(s):
        r = judge_one(cfg, model, rubric, s)
        with lock:
            done[0] += 1
            done[1] += r["llm_score"] is None
            if done[0] % every == 0 or done[0] == len(samples):
                print(f"judge: {done[0]}/{len(samples)} graded, {done[1]} without verdict, "
                      f"{time.time() - t0:.1f} s", file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        return list(pool.map(work, samples))


# ----------------------------------------------------------------------------- the run
def summarize(rows):
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    by_length = {}
    for r in rows:
        by_length.setdefault(r["length"], []).append(r)
    llm = [r["llm_score"] for r in rows]
    return {
        "n_samples": len(rows),
        "rule_mean": mean([r["rule_score"] for r in rows]),
        "llm_mean": mean(llm),
        "llm_scored": sum(s is not None for s in llm),
        "llm_none": sum(s is None for s in llm),
        "llm_histogram": {k: llm.count(k) for k in range(1, 6)},
        "attempts": sum(r["attempts"] for r in rows),
        "http_errors": sum(len(r["errors"]) for r in rows),
        "rule_vs_stored_mismatch": sum(r["stored_score"] is not None and abs(r["rule_score"] - r["stored_score"]) > 1e-9
                                       for r in rows),
        "by_length": {str(k): {"n": len(v), "rule_mean": mean([r["rule_score"] for r in v]),
                               "llm_mean": mean([r["llm_score"] for r in v])} for k, v in sorted(by_length.items(), key=lambda kv: str(kv[0]))},
        "agreement": agreement([r["rule_score"] for r in rows], llm),
    }


def die(msg):
    M.die("judge.py", msg)


def load_samples(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        die(f"--input={path}: {e.strerror}")
    except json.JSONDecodeError as e:
        die(f"--input={path} is not JSON: {e}")
    samples = data.get("samples") if isinstance(data, dict) else None
    if not isinstance(samples, list):
        die(f"--input={path} has no \"samples\" list (expected needle.py's results JSON)")
    if not samples:
        die(f"--input={path} has an empty \"samples\" list")
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            die(f"--input={path}: sample {i} is not an object")
        for key, typ in (("question", str), ("prediction", str), ("values", list)):
            if not isinstance(s.get(key), typ):
                die(f"--input={path}: sample {i} has no {key!r} ({typ.__name__})")
        if not s["values"] or not all(isinstance(v, str) for v in s["values"]):
            die(f"--input={path}: sample {i} needs a non-empty list of string 'values'")
    return data, samples


def parse_args(argv):
    cfg = M.parse_flags(JudgeConfig, argv, __doc__, prog="judge.py")
    if not cfg.input:
        die("--input=PATH (needle.py's results JSON) is required")
    for key in ("concurrency", "max_tokens"):
        if getattr(cfg, key) < 1:
            die(f"--{key} must be >= 1")
    for key in ("retries", "limit"):
        if getattr(cfg, key) < 0:
            die(f"--{key} must be >= 0")
    if cfg.timeout <= 0:
        die("--timeout must be > 0")
    return cfg


def main(argv):
    cfg = parse_args(argv)
    data, samples = load_samples(cfg.input)
    if cfg.limit:
        samples = samples[:cfg.limit]
    if cfg.rubric == "needle":
        rubric = NEEDLE_RUBRIC
    elif os.path.isfile(cfg.rubric):
        rubric = open(cfg.rubric).read().strip()
    else:
        die(f"--rubric={cfg.rubric!r} is neither 'needle' nor a file")
    out = cfg.out or os.path.join("results", "judge_" + os.path.splitext(os.path.basename(cfg.input))[0] + ".json")
    model = cfg.judge_model
    if not model:
        try:
            model = first_model(cfg)
        except (HTTPFailure, KeyError, IndexError, TypeError) as e:
            die(f"could not read a model name from {cfg.judge_url}/models ({e}); pass --judge_model")
    print(f"judge: {len(samples)} samples from {cfg.input}, judge {model} at {cfg.judge_url}", file=sys.stderr)

    graded = judge_all(cfg, model, rubric, samples)
    rows = []
    for i, (s, g) in enumerate(zip(samples, graded)):
        rows.append({"index": i, **{k: s.get(k) for k in ("length", "depth", "variant", "haystack", "seed")},
                     "question": s["question"], "prediction": s["prediction"], "values": s["values"],
                     "rule_score": string_match_all(s["prediction"], s["values"]), "stored_score": s.get("score"), **g})
    prov = M.provenance(card="CPU", judge_url=cfg.judge_url, judge_model=model)   # a client: the judge runs elsewhere
    result = {"provenance": prov, "input_provenance": data.get("provenance"),
              "config": {**vars(cfg), "rubric_text": rubric, "system_prompt": ABS_SYSTEM},
              "samples": rows, "summary": summarize(rows)}
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    sm = result["summary"]
    ag = sm["agreement"]
    print(f"judge: rule mean {sm['rule_mean']:.3f}, llm mean {sm['llm_mean'] if sm['llm_mean'] is None else round(sm['llm_mean'], 3)}, "
          f"{sm['llm_none']} without verdict; agreement n={ag['n']} accuracy={ag['accuracy']} kappa={ag['kappa']} -> {out}",
          file=sys.stderr)
    if samples and all(g["replies"] == 0 for g in graded):
        print(f"judge.py: error: no reply from {cfg.judge_url} for any sample ({graded[0]['errors'][-1]})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
