"""Issue #18, questions 1 and 2, answered by runs of this package (question 3: questions_budget.py).

  python benchmarks/questions.py difficulty --data-root ../shared/data/mnist   # Q1: tasks of unequal difficulty
  python benchmarks/questions.py domains --data-root ../shared/data/mnist      # Q2: different domains in one sequence

Each trains its runs under --runs (resumable: a finished run or evaluation is reused, an interrupted
run resumes), evaluates every run under each task-inference variant with ``evaluate_run`` (the same
code as ``supsup-fast evaluate``), and writes JSON and plots to --out. Every run is one
``supsup-fast run`` whose flags the JSON records under "commands".
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from supsup_fast.runs import evaluate_run, make_config, run_experiment  # noqa: E402
from supsup_fast.bench.report import stamp  # noqa: E402
from supsup_fast.runs.results import machine_info, write_json  # noqa: E402

# LeNet-300-100 with the paper's PermutedMNIST training (RMSprop 1e-4, 1000 batches of 128 per task),
# GNu (no task identity at test time, unshared labels), 100 output neurons (90 superfluous).
BASE = dict(scenario="GNu", model="lenet", iters=1000, batch_size=128, lr=1e-4, optimizer="rmsprop", output_size=100)
# The training loop stops a task after --iters batches or --epochs passes (3, as the official loop),
# whichever comes first: 100 images are 3 batches, 1,000 images 24. "1000 steps" lifts the cap so
# every task trains 1,000 batches and only the number of distinct images differs.
Q1_SEQUENCES = {"label noise": dict(benchmark="permuted-mnist-noisy", tasks=12),
                "training-set size, 3-epoch cap": dict(benchmark="permuted-mnist-sizes", tasks=12),
                "training-set size, 1000 steps": dict(benchmark="permuted-mnist-sizes", tasks=12, epochs=1280),
                "digit pairs": dict(benchmark="split-mnist-pairs", tasks=5)}


def run_name(seq: dict, seed: int) -> str:
    return f"{seq['benchmark']}{'-e' + str(seq['epochs']) if 'epochs' in seq else ''}-s{seed}"
OBJECTIVES = {"H": "entropy", "G": "superfluous"}
# (objective, inference, calibration[, images per query: 1 unless given])
Q1_VARIANTS = [("H", "oneshot", "none"), ("H", "oneshot", "entropy"), ("H", "oneshot", "logit-norm"),
               ("H", "binary", "none"), ("G", "oneshot", "none"), ("G", "oneshot", "entropy"),
               ("G", "oneshot", "logit-norm"), ("G", "binary", "none"), ("H", "oneshot", "none", 16)]
Q2_VARIANTS = [("H", "oneshot", "none"), ("G", "oneshot", "none"), ("H", "binary", "none"),
               ("H", "oneshot", "logit-norm"), ("H", "oneshot", "none", 16)]


def variant_name(v) -> str:
    obj, inference, cal = v[:3]
    images = v[3] if len(v) > 3 else 1
    return f"{obj} {inference}" + ("" if cal == "none" else f" +{cal}") + ("" if images == 1 else f" ({images} images)")


def command(settings: dict, out: Path) -> str:
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items() if k != "data_root")
    return f"supsup-fast run {flags} --data-root {settings.get('data_root')} --out {out}"


def train(settings: dict, out: Path) -> dict:
    """A finished run's results, training it first (or resuming it) when needed."""
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    config = make_config(settings)
    return run_experiment(config, out, resume=(out / "config.json").is_file(), progress=False)


def evaluate(run_dir: Path, variant, data_root: Optional[str]) -> dict:
    obj, inference, cal = variant[:3]
    images = variant[3] if len(variant) > 3 else 1
    out = run_dir / (f"eval-{obj}-{inference}-{cal}" + ("" if images == 1 else f"-i{images}"))
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    overrides = dict(objective=OBJECTIVES[obj], inference=inference, calibration=cal, infer_images=images)
    if data_root is not None:
        overrides["data_root"] = data_root
    return evaluate_run(run_dir, overrides, out, progress=False)


def mean_std(values: List[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def confusion(results: dict) -> List[List[int]]:
    """Queries per (true task, inferred task) of an evaluation: [k][k] (NNs: k true tasks × masks)."""
    row = results["accuracy_matrix"][-1]
    k = len(row["accuracy"])
    m = [[0] * max(k, results.get("num_masks", k)) for _ in range(k)]
    expected = (results.get("nns") or {}).get("mask_for_true_task") or list(range(k))
    for t in range(k):
        wrong = row["task_confusions"].get(str(t), {})
        for j, c in wrong.items():
            m[t][int(j)] += c
        if expected[t] is not None and expected[t] >= 0:
            m[t][expected[t]] += row["queries_per_task"][t] - sum(wrong.values())
    return m


# -- Q1 ------------------------------------------------------------------------------------------
def run_difficulty(args) -> dict:
    runs, out = Path(args.runs) / "q1", Path(args.out)
    jobs = [(name, seed) for name in Q1_SEQUENCES for seed in args.seeds]
    data: Dict[str, dict] = {name: {"runs": {}} for name in Q1_SEQUENCES}
    commands = []
    for name, seed in tqdm(jobs, desc="Q1 runs", unit="run"):
        seq = Q1_SEQUENCES[name]
        settings = dict(BASE, **seq, seed=seed, data_root=args.data_root)
        run_dir = runs / run_name(seq, seed)
        res = train(settings, run_dir)
        commands.append(command(settings, run_dir))
        entry = {"task_names": res["task_names"], "own_mask_accuracy": res["accuracy_after_training"],
                 "train_seconds": res["timing"]["train"], "variants": {}}
        for v in Q1_VARIANTS:
            ev = evaluate(run_dir, v, args.data_root)
            row = ev["accuracy_matrix"][-1]
            entry["variants"][variant_name(v)] = {
                "final_accuracy": ev["per_task_accuracy"], "task_inference": ev["per_task_inference_accuracy"],
                "task_confusions": row.get("task_confusions", {}), "mask_baselines": row.get("mask_baselines"),
                "eval_seconds": ev["timing"]["eval"]}
        data[name]["runs"][str(seed)] = entry
        write_json(out / "q1-difficulty.partial.json", {"sequences": data})
    for name in Q1_SEQUENCES:
        data[name]["summary"] = summarise_difficulty(data[name]["runs"])
    result = {"question": "Does task inference stay right when some tasks are much harder than others?",
              "settings": BASE, "sequences": data, "variants": [variant_name(v) for v in Q1_VARIANTS],
              "seeds": args.seeds, "commands": commands,
              "evaluate_commands": [f"supsup-fast evaluate RUN --objective {OBJECTIVES[v[0]]} --inference {v[1]} "
                                    f"--calibration {v[2]} --infer-images {v[3] if len(v) > 3 else 1} "
                                    f"--data-root {args.data_root} --out RUN/eval-..." for v in Q1_VARIANTS],
              "machine": machine_info(torch.device("cpu")), **stamp()}
    write_json(out / "q1-difficulty.json", result)
    (out / "q1-difficulty.partial.json").unlink(missing_ok=True)
    plot_difficulty(result, out / "q1-difficulty.png")
    return result


def summarise_difficulty(runs: Dict[str, dict]) -> dict:
    """Per difficulty level: mean ± std over seeds of each seed's mean over that level's tasks; and
    where the wrongly inferred queries went: to the mask of an easier level (higher own-mask accuracy),
    of the same level, or of a harder one."""
    levels = list(dict.fromkeys(name for r in runs.values() for name in r["task_names"]))

    def per_level(values_of, r):
        return {lv: statistics.fmean(v for v, n in zip(values_of(r), r["task_names"]) if n == lv) for lv in levels}

    out = {"levels": levels, "own_mask_accuracy": {}, "variants": {}}
    own = [per_level(lambda r: r["own_mask_accuracy"], r) for r in runs.values()]
    out["own_mask_accuracy"] = {lv: mean_std([o[lv] for o in own]) for lv in levels}
    ease = {lv: out["own_mask_accuracy"][lv]["mean"] for lv in levels}
    out["levels_easiest_first"] = sorted(levels, key=lambda lv: -ease[lv])
    names = list(next(iter(runs.values()))["variants"])
    for vn in names:
        fin = [per_level(lambda r: r["variants"][vn]["final_accuracy"], r) for r in runs.values()]
        ti = [per_level(lambda r: r["variants"][vn]["task_inference"], r) for r in runs.values()]
        went = {"easier": 0, "same level": 0, "harder": 0}
        for r in runs.values():
            for t, wrong_counts in r["variants"][vn]["task_confusions"].items():
                for j, c in wrong_counts.items():
                    a, b = ease[r["task_names"][int(j)]], ease[r["task_names"][int(t)]]
                    went["easier" if a > b else "harder" if a < b else "same level"] += c
        out["variants"][vn] = {
            "final_accuracy": {lv: mean_std([f[lv] for f in fin]) for lv in levels},
            "task_inference": {lv: mean_std([x[lv] for x in ti]) for lv in levels},
            "average_final_accuracy": mean_std([statistics.fmean(r["variants"][vn]["final_accuracy"]) for r in runs.values()]),
            "average_task_inference": mean_std([statistics.fmean(r["variants"][vn]["task_inference"]) for r in runs.values()]),
            "wrong_queries": sum(went.values()), "wrong_queries_went_to": went}
    return out


def plot_difficulty(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seqs = result["sequences"]
    fig, axes = plt.subplots(2, len(seqs), figsize=(4.8 * len(seqs), 8.5), squeeze=False)
    for col, (name, seq) in enumerate(seqs.items()):
        s = seq["summary"]
        levels = s["levels_easiest_first"]
        x = list(range(len(levels)))
        ax = axes[0][col]
        for i, vn in enumerate(result["variants"]):
            ti = s["variants"][vn]["task_inference"]
            ax.errorbar([xi + (i - 4) * 0.035 for xi in x], [ti[lv]["mean"] for lv in levels],
                        yerr=[ti[lv]["std"] for lv in levels], marker="o", capsize=3, label=vn,
                        linestyle="-" if vn.startswith("H") else "--")
        ax.set_xticks(x, levels, rotation=15)
        ax.set_title(f"{name}: task inference (easiest task first)")
        ax.set_ylabel("queries inferred right")
        ax.grid(alpha=0.3)
        if col == 0:
            ax.legend(fontsize=7)
        ax = axes[1][col]
        own = s["own_mask_accuracy"]
        ax.errorbar(x, [own[lv]["mean"] for lv in levels], yerr=[own[lv]["std"] for lv in levels], marker="s",
                    capsize=3, color="black", label="own mask (task given)")
        for vn in ("H oneshot", "G oneshot", "H oneshot +logit-norm"):
            fa = s["variants"][vn]["final_accuracy"]
            ax.errorbar(x, [fa[lv]["mean"] for lv in levels], yerr=[fa[lv]["std"] for lv in levels], marker="o",
                        capsize=3, label=f"final, GNu {vn}")
        ax.set_xticks(x, levels, rotation=15)
        ax.set_title(f"{name}: accuracy")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Q1: tasks of unequal difficulty (LeNet, GNu, s=100; mean ± std over seeds {result['seeds']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# -- Q2 ------------------------------------------------------------------------------------------
def run_domains(args) -> dict:
    runs, out = Path(args.runs) / "q2", Path(args.out)
    result = {"question": "Does task inference confuse semantically different domains, and does NNs allocate "
                          "one mask per domain?", "settings": BASE, "seeds": args.seeds, "gnu": {}, "nns": {},
              "commands": [], "machine": machine_info(torch.device("cpu")), **stamp()}
    for seed in tqdm(args.seeds, desc="Q2 runs", unit="seed"):
        settings = dict(BASE, benchmark="mixed-domains", tasks=7, seed=seed, data_root=args.data_root)
        run_dir = runs / f"gnu-s{seed}"
        res = train(settings, run_dir)
        result["commands"].append(command(settings, run_dir))
        entry = {"task_names": res["task_names"], "own_mask_accuracy": res["accuracy_after_training"], "variants": {}}
        for v in Q2_VARIANTS:
            ev = evaluate(run_dir, v, args.data_root)
            entry["variants"][variant_name(v)] = {"final_accuracy": ev["per_task_accuracy"],
                                                  "task_inference": ev["per_task_inference_accuracy"],
                                                  "confusion": confusion(ev)}
        result["gnu"][str(seed)] = entry
        nns_settings = dict(BASE, benchmark="mixed-domains", tasks=7, seed=seed, data_root=args.data_root,
                            scenario="NNs")
        nns_dir = runs / f"nns-s{seed}"
        nres = train(nns_settings, nns_dir)
        result["commands"].append(command(nns_settings, nns_dir))
        result["nns"][str(seed)] = {"task_names": nres["task_names"], "num_masks": nres["num_masks"],
                                    "mask_for_true_task": nres["nns"]["mask_for_true_task"],
                                    "new_masks_per_true_task": nres["nns"]["new_masks_per_true_task"],
                                    "final_accuracy": nres["per_task_accuracy"],
                                    "own_mask_accuracy": nres["accuracy_after_training"],
                                    "task_inference": nres["per_task_inference_accuracy"],
                                    "confusion": confusion(nres)}
        write_json(out / "q2-domains.partial.json", result)
    result["summary"] = summarise_domains(result)
    write_json(out / "q2-domains.json", result)
    (out / "q2-domains.partial.json").unlink(missing_ok=True)
    plot_domains(result, out / "q2-domains.png")
    return result


def summarise_domains(result: dict) -> dict:
    gnu = list(result["gnu"].values())
    names = gnu[0]["task_names"]
    out = {"domains": names, "own_mask_accuracy": {n: mean_std([g["own_mask_accuracy"][t] for g in gnu])
                                                   for t, n in enumerate(names)}, "gnu": {}, "nns": {}}
    for vn in gnu[0]["variants"]:
        out["gnu"][vn] = {
            "task_inference": {n: mean_std([g["variants"][vn]["task_inference"][t] for g in gnu]) for t, n in enumerate(names)},
            "final_accuracy": {n: mean_std([g["variants"][vn]["final_accuracy"][t] for g in gnu]) for t, n in enumerate(names)},
            "average_task_inference": mean_std([statistics.fmean(g["variants"][vn]["task_inference"]) for g in gnu]),
            "average_final_accuracy": mean_std([statistics.fmean(g["variants"][vn]["final_accuracy"]) for g in gnu]),
            "confusion_summed_over_seeds": [[sum(g["variants"][vn]["confusion"][i][j] for g in gnu)
                                             for j in range(len(names))] for i in range(len(names))]}
    nns = list(result["nns"].values())
    out["nns"] = {"masks_per_seed": [n["num_masks"] for n in nns],
                  "one_new_mask_per_domain_in_seeds": sum(n["new_masks_per_true_task"] == [1] * len(names) for n in nns),
                  "average_final_accuracy": mean_std([statistics.fmean(n["final_accuracy"]) for n in nns]),
                  "average_task_inference": mean_std([statistics.fmean(n["task_inference"]) for n in nns])}
    return out


def plot_domains(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = result["summary"]
    names = s["domains"]
    panels = [(f"GNu, {vn}", s["gnu"][vn]["confusion_summed_over_seeds"], names, "inferred task")
              for vn in ("H oneshot", "G oneshot", "H oneshot (16 images)") if vn in s["gnu"]]
    nns = list(result["nns"].values())
    width = max(len(n["confusion"][0]) for n in nns)
    panels.append(("NNs, H oneshot: masks allocated without task identity",
                   [[sum(n["confusion"][i][j] if j < len(n["confusion"][i]) else 0 for n in nns) for j in range(width)]
                    for i in range(len(names))], [f"mask {j}" for j in range(width)], "inferred mask"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 6))
    for ax, (title, m, cols, xlabel) in zip(axes, panels):
        totals = [max(1, sum(r)) for r in m]
        frac = [[c / tot for c in r] for r, tot in zip(m, totals)]
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i, r in enumerate(m):
            for j, c in enumerate(r):
                if c:
                    ax.text(j, i, str(c), ha="center", va="center", fontsize=7,
                            color="white" if frac[i][j] > 0.5 else "black")
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("true domain")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"Q2: test queries by true and inferred task, summed over seeds {result['seeds']} (LeNet, s=100)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def pm(x: dict, digits: int = 3) -> str:
    return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"


def tables(out: Path) -> str:
    """Markdown tables of the finished JSONs (for the report in --out/README.md)."""
    lines = []
    q1 = out / "q1-difficulty.json"
    if q1.is_file():
        r = json.loads(q1.read_text())
        shown = ["H oneshot", "G oneshot", "H binary", "H oneshot (16 images)", "H oneshot +entropy",
                 "H oneshot +logit-norm"]
        for name, seq in r["sequences"].items():
            s = seq["summary"]
            lines += ["", f"**{name}** (task inference; last column: final accuracy with H one-shot)", "",
                      "| task | own-mask accuracy | " + " | ".join(shown) + " | final, H one-shot |",
                      "|---" * (len(shown) + 3) + "|"]
            for lv in s["levels_easiest_first"]:
                v = s["variants"]
                lines.append(f"| {lv} | {pm(s['own_mask_accuracy'][lv])} | "
                             + " | ".join(pm(v[vn]["task_inference"][lv]) for vn in shown)
                             + f" | {pm(v['H oneshot']['final_accuracy'][lv])} |")
            lines.append("| **average** | | " + " | ".join(pm(s["variants"][vn]["average_task_inference"]) for vn in shown)
                         + f" | {pm(s['variants']['H oneshot']['average_final_accuracy'])} |")
            lines += ["", "Wrongly inferred queries, by where they went (summed over seeds): "
                      + "; ".join(f"{vn}: {s['variants'][vn]['wrong_queries']} "
                                  f"({', '.join(f'{k} {c}' for k, c in s['variants'][vn]['wrong_queries_went_to'].items())})"
                                  for vn in shown)]
    q2 = out / "q2-domains.json"
    if q2.is_file():
        r = json.loads(q2.read_text())
        s = r["summary"]
        shown = list(s["gnu"])
        lines += ["", "**GNu over mixed domains** (task inference per domain)", "",
                  "| domain | own-mask accuracy | " + " | ".join(shown) + " |", "|---" * (len(shown) + 2) + "|"]
        for d in s["domains"]:
            lines.append(f"| {d} | {pm(s['own_mask_accuracy'][d])} | "
                         + " | ".join(pm(s["gnu"][vn]["task_inference"][d]) for vn in shown) + " |")
        lines.append("| **average final accuracy** | | " + " | ".join(pm(s["gnu"][vn]["average_final_accuracy"])
                                                                  for vn in shown) + " |")
        lines += ["", "**NNs over mixed domains** (per seed)", "",
                  "| seed | masks | mask of each true task | new masks per true task | final accuracy per domain |",
                  "|---|---|---|---|---|"]
        for seed, n in r["nns"].items():
            lines.append(f"| {seed} | {n['num_masks']} | {n['mask_for_true_task']} | {n['new_masks_per_true_task']} | "
                         + ", ".join(f"{a:.3f}" for a in n["final_accuracy"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", choices=("difficulty", "domains", "tables"),
                   help="tables: print the report's markdown tables from the JSONs in --out")
    p.add_argument("--data-root", default=None, help="MNIST folder (default: the embedded subset, for smoke runs)")
    p.add_argument("--runs", default="runs/questions", help="where the runs are trained (reused when finished)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "questions"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--iters", type=int, default=None, help="training batches per task (default 1000; smoke runs)")
    args = p.parse_args(argv)
    if args.iters is not None:
        BASE["iters"] = args.iters
    if args.question == "tables":
        print(tables(Path(args.out)))
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = run_difficulty(args) if args.question == "difficulty" else run_domains(args)
    print(json.dumps(result.get("summary") or {k: v["summary"] for k, v in result["sequences"].items()}, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
