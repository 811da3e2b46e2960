"""eval_mmlu.py against lm-evaluation-harness on the same Hugging Face export, each timed as a whole
process (start-up counts), with the per-question answers compared.

    pip install lm_eval==0.4.13    # a benchmark tool, not a kiln dependency
    python bench/bench_lm_eval.py --rounds 3                     # out/demo, exported here
    python bench/bench_lm_eval.py --hf /tmp/hf_demo --shots 5 --add_bos_token
    python bench/bench_lm_eval.py --shots 5 --context 2048   # no 5-shot prompt cut: same answers

For each round and each --shots value it runs, one after the other on the same machine,
    lm_eval --model hf --model_args pretrained=HF[,add_bos_token=True] --tasks kiln_mmlu_<subject>,...
            --num_fewshot K --device cpu --batch_size N --log_samples --output_path DIR
    python eval_mmlu.py --ckpt HF --data DATA --subjects ... --shots K --device cpu --batch_size N
            --out FILE
(lm-eval first, then kiln, alternating, so drift in machine load hits both alike), and prints the
questions per second of each, the median of the per-round ratios (lm-eval's seconds over kiln's:
above 1, kiln answers faster), the same ratio of CPU seconds (user + system of the whole process:
steadier than wall time when others load the box), the scoring loop's share (from each tool's
progress bar), and how many answers (argmax of the four log-likelihoods) agree, with the largest
log-likelihood difference.

lm-eval reads MMLU from --data (the original CSV layout, {dev,test}/<subject>_{dev,test}.csv), not
from the hub: the CSVs become JSON lines shaped like cais/mmlu (question, subject, choices, answer
0-3), and each subject's task YAML includes lm-eval's own `mmlu` template
(lm_eval/tasks/mmlu/default/_default_template_yaml: doc_to_text, choices, few-shot from dev, first_n)
with only the data files and lm-eval's per-subject description. Hub and datasets run offline.

BOS: by default lm-eval runs with its defaults (the tokenizer's own BOS rule, as issue 13 wants);
--add_bos_token passes add_bos_token=True. A question whose full prompt is longer than the model's
context is scored differently by design (kiln drops few-shot examples, lm-eval cuts tokens on the
left): agreement is also given over the questions whose prompt fits, and --context N gives both
tools a copy of the export that says a context of N tokens (RoPE: any length runs; the demo model's
5-shot prompts are up to ~1,600 tokens, its context 512). Both processes get the same
environment; --threads sets OMP_NUM_THREADS and MKL_NUM_THREADS for both (default: unset for both).
On a small shared CPU box use --threads 1: with 2 threads on 2 busy cores both tools scored 5-8x
slower (the thread barriers of many small ops), and the timings swung 2x from round to round.
"""
import csv
import importlib.util
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import config  # after the sys.path line: the repo root holds the modules

LETTERS = "ABCD"
SUBJECTS = "abstract_algebra,anatomy,astronomy,college_biology,marketing"


@dataclass
class Args:
    hf: str | None = None         # exported Hugging Face folder (default: export --ckpt into --work)
    ckpt: str = "out/demo"        # the kiln checkpoint to export when --hf is not given
    data: str | None = None       # MMLU CSV folder (default: ../shared/data/mmlu beside the repo)
    subjects: str = SUBJECTS      # comma-separated
    shots: str = "0,5"            # comma-separated few-shot counts
    rounds: int = 3
    warmup: bool = True           # one untimed run of each first (datasets cache, .pyc, page cache)
    batch_size: int = 16          # the same for both
    add_bos_token: bool = False   # lm-eval with add_bos_token=True instead of its defaults
    context: int | None = None    # give a copy of the export this context (no prompt is cut)
    threads: int | None = None    # OMP_NUM_THREADS / MKL_NUM_THREADS for both (default: unset)
    work: str = "bench/out/lm_eval"  # data, task YAMLs, outputs and logs
    out: str | None = None        # write every round and the summary as JSON


def lm_eval_template():
    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        sys.exit("error: lm_eval is not installed; pip install lm_eval==0.4.13 (benchmark only)")
    path = Path(spec.origin).parent / "tasks" / "mmlu" / "default" / "_default_template_yaml"
    if not path.is_file():
        sys.exit(f"error: lm-eval's mmlu template is not at {path}; this lm_eval is not 0.4.x")
    return path


def read_csv(path):
    """Rows as kiln's mmlu.py reads them (csv module, fields untouched, answer stripped)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [{"question": r[0], "choices": r[1:5], "answer": LETTERS.index(r[5].strip())}
                for r in csv.reader(fh)]


def write_tasks(data, subjects, work):
    """JSON lines per subject and split, one task YAML per subject -> the folder for
    --include_path."""
    tasks = work / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    template = lm_eval_template()
    for s in subjects:
        files = {}
        for split in ("test", "dev"):
            rows = read_csv(Path(data) / split / f"{s}_{split}.csv")
            files[split] = tasks / f"{s}_{split}.jsonl"
            files[split].write_text("".join(json.dumps({**r, "subject": s}) + "\n" for r in rows))
        description = f"The following are multiple choice questions (with answers) about " \
                      f"{s.replace('_', ' ')}.\n\n"
        yaml = (f"include: {json.dumps(str(template))}\n"
                f"task: kiln_mmlu_{s}\n"
                f"dataset_path: json\n"
                f"dataset_name: null\n"
                f"dataset_kwargs:\n  data_files:\n"
                f"    test: {json.dumps(str(files['test']))}\n"
                f"    dev: {json.dumps(str(files['dev']))}\n"
                f"description: {json.dumps(description)}\n")
        (tasks / f"kiln_mmlu_{s}.yaml").write_text(yaml)
    return tasks


def environment(args, work):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(work / "datasets_cache"))
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return env


def commands(args, hf, data, subjects, tasks, shots, out):
    """(lm-eval argv, kiln argv) for one run writing under out."""
    bin_dir = Path(sys.executable).parent
    lm_eval = str(bin_dir / "lm_eval") if (bin_dir / "lm_eval").exists() else "lm_eval"
    model_args = f"pretrained={hf}" + (",add_bos_token=True" if args.add_bos_token else "")
    lm = [lm_eval, "--model", "hf", "--model_args", model_args, "--include_path", str(tasks),
          "--tasks", ",".join(f"kiln_mmlu_{s}" for s in subjects), "--num_fewshot", str(shots),
          "--device", "cpu", "--batch_size", str(args.batch_size), "--log_samples",
          "--output_path", str(out / "lm_eval")]
    kiln = [sys.executable, str(ROOT / "eval_mmlu.py"), "--ckpt", str(hf), "--data", str(data),
            "--subjects", ",".join(subjects), "--shots", str(shots), "--device", "cpu",
            "--batch_size", str(args.batch_size), "--out", str(out / "kiln.json")]
    return lm, kiln


def cpu_seconds_of_children():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv, env, log, bar):
    """Wall seconds of the whole process, its CPU seconds (user + system, all its threads: less
    swayed than wall time by other work on a shared box), and the elapsed time of its last
    progress bar named `bar` (the scoring loop; tqdm's whole seconds)."""
    t0 = time.perf_counter()
    cpu0 = cpu_seconds_of_children()
    with open(log, "w") as fh:
        proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds_of_children() - cpu0
    text = Path(log).read_text()
    if proc.returncode:
        sys.exit(f"error: {' '.join(argv)} exited {proc.returncode}; its output: {log}\n"
                 + text[-3000:])
    done = re.findall(re.escape(bar) + r": 100%\|[^|]*\| \d+/\d+ \[(?:(\d+):)?(\d+):(\d+)<", text)
    h, m, s = done[-1] if done else ("", "nan", "nan")
    return seconds, cpu, float(h or 0) * 3600 + float(m) * 60 + float(s)


def lm_eval_answers(out):
    """{(subject, index): (four log-likelihoods, context string)} from lm-eval's samples files."""
    answers = {}
    files = sorted((out / "lm_eval").rglob("samples_kiln_mmlu_*.jsonl"))
    if not files:
        sys.exit(f"error: lm-eval wrote no samples_kiln_mmlu_*.jsonl under {out / 'lm_eval'}")
    for f in files:
        subject = f.name.removeprefix("samples_kiln_mmlu_").rsplit("_", 1)[0]
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            lls = [float(r[0]) for r in rec["filtered_resps"]]
            args = rec["arguments"]
            first = args[0] if isinstance(args, list) else next(iter(args.values()))
            context = first[0] if isinstance(first, list) else first["arg_0"]
            answers[subject, rec["doc_id"]] = (lls, context)
    return answers


def compare(kiln_json, lm, hf):
    """Agreement of the argmax over all questions and over those whose prompt fits the context,
    the largest |log-likelihood difference| over the fitting ones."""
    from transformers import AutoConfig, AutoTokenizer, logging  # here: in no one's timing
    logging.set_verbosity_error()  # "longer than the maximum sequence length": counted below
    tok = AutoTokenizer.from_pretrained(hf)
    max_len = AutoConfig.from_pretrained(hf).max_position_embeddings
    questions = json.loads(Path(kiln_json).read_text())["questions"]
    agree = agree_fit = n_fit = 0
    diff = 0.0
    for q in questions:
        lls, context = lm[q["subject"], q["index"]]
        same = q["pred"] == LETTERS[max(range(4), key=lls.__getitem__)]
        agree += same
        # as both score it: the row fed to the model is context + " X" less its last token
        if len(tok(context + " A")["input_ids"]) - 1 <= max_len:
            n_fit += 1
            agree_fit += same
            diff = max(diff, *(abs(a - b) for a, b in zip(q["loglik"], lls)))
    if len(questions) != len(lm):
        sys.exit(f"error: kiln answered {len(questions)} questions, lm-eval {len(lm)}")
    return {"n": len(questions), "agree": agree, "n_fit": n_fit, "agree_fit": agree_fit,
            "max_abs_ll_diff_fit": diff}


def export(args, work):
    """The Hugging Face folder both tools read: --hf, or --ckpt exported; with --context, a copy
    whose config.json (max_position_embeddings) and tokenizer (model_max_length) say that
    context."""
    hf = Path(args.hf).resolve() if args.hf else work / "hf"
    if not args.hf:
        print(f"exporting {args.ckpt} -> {hf}", flush=True)
        proc = subprocess.run([sys.executable, str(ROOT / "export_hf.py"), args.ckpt, str(hf)],
                              cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"error: export_hf.py {args.ckpt} failed:\n{proc.stderr[-2000:]}")
    if not args.context:
        return hf
    longer = work / f"hf_context{args.context}"
    shutil.rmtree(longer, ignore_errors=True)
    shutil.copytree(hf, longer)
    for name, key in (("config.json", "max_position_embeddings"),
                      ("tokenizer_config.json", "model_max_length")):
        cfg = json.loads((longer / name).read_text())
        cfg[key] = args.context
        (longer / name).write_text(json.dumps(cfg, indent=1) + "\n")
    return longer


def run_pair(args, ctx, shots, tag):
    """One lm-eval run then one kiln run at `shots` -> (lm-eval s, kiln s, comparison)."""
    hf, data, subjects, tasks, env, work = ctx
    out = work / "runs" / f"{tag}_{shots}shot"
    lm, kiln = commands(args, hf, data, subjects, tasks, shots, out)
    shutil.rmtree(out, ignore_errors=True)  # lm-eval adds files per run: read only this run's
    out.mkdir(parents=True)
    t_lm, cpu_lm, score_lm = timed(lm, env, out / "lm_eval.log", "Running loglikelihood requests")
    t_kiln, cpu_kiln, score_kiln = timed(kiln, env, out / "kiln.log", "mmlu")
    cmp = compare(out / "kiln.json", lm_eval_answers(out), hf)
    return t_lm, t_kiln, {**cmp, "lm_eval_scoring_s": score_lm, "kiln_scoring_s": score_kiln,
                          "lm_eval_cpu_s": cpu_lm, "kiln_cpu_s": cpu_kiln,
                          "cpu_ratio": cpu_lm / cpu_kiln}


def main():
    args = config.parse_args(Args(), doc=__doc__)
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data or ROOT.parent / "shared" / "data" / "mmlu").resolve()
    subjects = args.subjects.split(",")
    shots_list = [int(k) for k in args.shots.split(",")]
    hf = export(args, work)
    ctx = (hf, data, subjects, write_tasks(data, subjects, work), environment(args, work), work)
    bos = "add_bos_token=True" if args.add_bos_token else "lm-eval defaults (tokenizer's own BOS)"
    print(f"{hf} (context {args.context or 'as exported'}), {len(subjects)} subjects, batch "
          f"{args.batch_size}, threads "
          f"{args.threads or 'unset'}, {bos}", flush=True)
    if args.warmup:
        t_lm, t_kiln, _ = run_pair(args, ctx, shots_list[0], "warmup")
        print(f"warm-up ({shots_list[0]}-shot, untimed): lm-eval {t_lm:.1f} s, kiln {t_kiln:.1f} s",
              flush=True)
    rounds = {k: [] for k in shots_list}
    for r in range(args.rounds):
        for k in shots_list:
            t_lm, t_kiln, cmp = run_pair(args, ctx, k, f"round{r}")
            rounds[k].append({"lm_eval_s": t_lm, "kiln_s": t_kiln, "ratio": t_lm / t_kiln, **cmp})
            print(f"round {r} {k}-shot: lm-eval {t_lm:.1f} s ({cmp['n'] / t_lm:.1f} q/s; scoring "
                  f"{cmp['lm_eval_scoring_s']:.0f} s), kiln {t_kiln:.1f} s ({cmp['n'] / t_kiln:.1f} "
                  f"q/s; scoring {cmp['kiln_scoring_s']:.0f} s), ratio {t_lm / t_kiln:.2f} (CPU "
                  f"seconds {cmp['lm_eval_cpu_s']:.1f} / {cmp['kiln_cpu_s']:.1f} = "
                  f"{cmp['cpu_ratio']:.2f}); "
                  f"agree {cmp['agree']}/{cmp['n']}, on the {cmp['n_fit']} that fit "
                  f"{cmp['agree_fit']}/{cmp['n_fit']}, max |ll diff| "
                  f"{cmp['max_abs_ll_diff_fit']:.1e}", flush=True)
    summary = {}
    for k, rs in rounds.items():
        n = rs[0]["n"]
        summary[k] = {"questions": n, "median_ratio": statistics.median(r["ratio"] for r in rs),
                      "median_cpu_ratio": statistics.median(r["cpu_ratio"] for r in rs),
                      "lm_eval_qps": statistics.median(n / r["lm_eval_s"] for r in rs),
                      "kiln_qps": statistics.median(n / r["kiln_s"] for r in rs)}
        print(f"{k}-shot, {n} questions, {len(rs)} rounds: kiln {summary[k]['kiln_qps']:.1f} q/s, "
              f"lm-eval {summary[k]['lm_eval_qps']:.1f} q/s (medians); median ratio "
              f"{summary[k]['median_ratio']:.2f}x (CPU seconds: "
              f"{summary[k]['median_cpu_ratio']:.2f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "hf": str(hf), "rounds": rounds,
                                              "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
