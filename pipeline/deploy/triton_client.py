"""A tritonclient (HTTP) client of a served ensemble: send texts, and send malformed requests.
Runs with the serving environment's Python (it imports tritonclient); standalone on purpose.

    .venv-serve/bin/python pipeline/deploy/triton_client.py infer URL MODEL IN.jsonl OUT.jsonl [--batch 8]
        IN: one {"text": ...} per line; OUT: per text the ensemble's outputs (label, scores /
        sentence_embedding / entities, truncated), in order.
    .venv-serve/bin/python pipeline/deploy/triton_client.py bad URL MODEL VALID_TEXT MAX_BATCH_SIZE
        Sends each bad request (empty text, invalid UTF-8, a 100,000-character text, a wrong input name, a
        wrong dtype, a batch above max_batch_size), each followed by one valid request; prints a JSON list
        {case, accepted, error, truncated, next_valid_ok}.
"""

import json
import sys

import numpy as np
import tritonclient.http as http
from tritonclient.utils import InferenceServerException


def _text_input(texts, name="TEXT"):
    arr = np.array([[t if isinstance(t, bytes) else t.encode("utf-8")] for t in texts], dtype=np.object_)
    x = http.InferInput(name, list(arr.shape), "BYTES")
    x.set_data_from_numpy(arr)
    return x


def _outputs(client, model):
    return [o["name"] for o in client.get_model_metadata(model)["outputs"]]


def _rows(result, names):
    cols = {n: result.as_numpy(n) for n in names}
    n = len(next(iter(cols.values())))
    rows = []
    for i in range(n):
        row = {}
        for name, col in cols.items():
            v = col[i]
            if col.dtype == np.object_:
                v = v[0].decode("utf-8")
                row[name] = json.loads(v) if name == "entities" else v
            elif col.dtype == np.bool_:
                row[name] = bool(v[0])
            else:
                row[name] = v.tolist()
        rows.append(row)
    return rows


def infer(url, model, src, dst, batch=8):
    client = http.InferenceServerClient(url.replace("http://", ""))
    names = _outputs(client, model)
    texts = [json.loads(line)["text"] for line in open(src, encoding="utf-8") if line.strip()]
    with open(dst, "w", encoding="utf-8") as out:
        for start in range(0, len(texts), batch):
            result = client.infer(model, [_text_input(texts[start : start + batch])])
            for row in _rows(result, names):
                out.write(json.dumps(row) + "\n")


def bad(url, model, valid, max_batch_size):
    client = http.InferenceServerClient(url.replace("http://", ""))
    names = _outputs(client, model)
    wrong_dtype = http.InferInput("TEXT", [1, 1], "FP32")
    wrong_dtype.set_data_from_numpy(np.zeros((1, 1), dtype=np.float32))
    cases = {
        "empty_text": [_text_input([""])],
        "invalid_utf8": [_text_input([b"\xff\xfe\xfd not utf-8"])],
        "text_100k_chars": [_text_input([("a fine film " * 9000)[:100_000]])],
        "wrong_input_name": [_text_input([valid], name="TEXTS")],
        "wrong_dtype": [wrong_dtype],
        "batch_above_max": [_text_input([valid] * (int(max_batch_size) + 1))],
    }
    report = []
    for case, inputs in cases.items():
        row = {"case": case, "accepted": False, "error": None, "truncated": None}
        try:
            result = client.infer(model, inputs)
            row["accepted"] = True
            row["truncated"] = bool(result.as_numpy("truncated")[0][0]) if "truncated" in names else None
        except InferenceServerException as exc:
            row["error"] = str(exc)
        try:
            client.infer(model, [_text_input([valid])])
            row["next_valid_ok"] = True
        except InferenceServerException as exc:
            row["next_valid_ok"] = False
            row["next_error"] = str(exc)
        report.append(row)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "infer":
        batch = int(args[args.index("--batch") + 1]) if "--batch" in args else 8
        infer(*args[:4], batch=batch)
    elif cmd == "bad":
        bad(*args[:4])
    else:
        sys.exit(f"unknown command {cmd!r}: infer | bad")
