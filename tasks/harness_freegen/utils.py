"""The harness_freegen task: open-ended writing prompts, for comparing the output
quality of decoders. Scores describe the text itself (no reference answer):
distinct-2 (lexical diversity) and length in words. Output perplexity under the
target, the paper's quality figure, comes from the decoding traces
(``trace_dir`` / ``--output_path``)."""

import json
from pathlib import Path

import datasets


def load(**kwargs):
    rows = [json.loads(line) for line in (Path(__file__).parent / "freegen.jsonl").read_text().splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc, results):
    words = results[0].split()
    bigrams = list(zip(words, words[1:], strict=False))
    return {
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        "words": float(len(words)),
    }
