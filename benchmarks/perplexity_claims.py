"""Output-perplexity comparison of a run's decoders, paired by prompt and repeat.

    python benchmarks/perplexity_claims.py RUN_DIR [--out FILE.json]

For each decoder: mean per-generation perplexity under the target with a 95%
bootstrap interval; against `sampling`: the ratio of means with a paired
bootstrap interval and a two-sided Wilcoxon signed-rank p-value. This is the
check of MTAD's quality claim (about 21% lower perplexity than sampling) and of
speculative decoding's exactness (no difference from sampling beyond noise).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import wilcoxon

from harness import trace
from harness.stats import bootstrap, mean_ci


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--out")
    args = ap.parse_args()
    gens = trace.read_table(args.run_dir)
    info = trace.read_run_json(args.run_dir)
    base = gens[gens.decoder == "sampling"].set_index(["prompt_id", "repeat"]).output_ppl
    result = {"run": str(args.run_dir), "profile": info.get("profile", {}).get("name"),
              "device": info.get("model_info", {}).get("device"), "decoders": {}}
    print(f"{'decoder':<14}{'n':>4}  {'mean ppl [95% CI]':<28}{'ratio to sampling [95% CI]':<32}{'Wilcoxon p':>10}")
    for label, g in gens.groupby("decoder_label", sort=False):
        ppl = g.set_index(["prompt_id", "repeat"]).output_ppl
        est = mean_ci(ppl.to_numpy())
        row = {"n": len(ppl), "mean_ppl": est.value, "ci95": [est.low, est.high]}
        text = ""
        if label != "sampling" and len(base):
            a, b = ppl.align(base, join="inner")
            ratio = bootstrap({"a": a.to_numpy(), "b": b.to_numpy()}, lambda c: float(c["a"].mean() / c["b"].mean()))
            p = float(wilcoxon(a.to_numpy(), b.to_numpy()).pvalue) if len(a) > 1 else float("nan")
            row.update(paired=len(a), ratio_to_sampling=ratio.value, ratio_ci95=[ratio.low, ratio.high],
                       wilcoxon_p=p)
            text = f"{ratio.value:.3f} [{ratio.low:.3f}, {ratio.high:.3f}]"
            print(f"{label:<14}{len(ppl):>4}  {est.fmt('.3f'):<28}{text:<32}{p:>10.2g}")
        else:
            print(f"{label:<14}{len(ppl):>4}  {est.fmt('.3f'):<28}{'-':<32}{'-':>10}")
        result["decoders"][label] = row
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
