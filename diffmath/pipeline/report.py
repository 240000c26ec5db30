"""The tables of ``diffmath evaluate`` and ``diffmath demo``: metric rows, the guidance and
per-class tables, and the demo's report.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .io import atomic_write_text


def metric_rows(m: dict) -> list[tuple[str, str, str]]:
    """The headline metrics of an ``evaluate_run`` result as (metric, samples, reference) rows of
    formatted text: the one formatting of the metrics, shared by the terminal (``format_metrics``)
    and the reports (``metrics_table``: ``write_report`` and the latent demo's report.md)."""
    rows = []
    if "mean_confidence" in m:
        rh = m["real_held_out"]
        rows += [
            (
                "mean classifier confidence",
                f"{m['mean_confidence']:.3f}",
                f"real held-out: {rh['mean_confidence']:.3f}",
            ),
            ("digit classes present", f"{m['classes_present']} / 10", f"real held-out: {rh['classes_present']} / 10"),
            ("class entropy (bits)", f"{m['class_entropy_bits']:.3f}", f"uniform: {m['max_entropy_bits']:.3f}"),
        ]
    if "frechet_distance" in m:
        fd = m["frechet_distance"]
        rows.append(
            (
                f"Fréchet distance (classifier features, n = {fd['n']})",
                f"{fd['samples']:.3f}",
                f"floor (real held-out): {fd['held_out_real (floor)']:.3f}; "
                f"ceiling (Gaussian noise): {fd['gaussian_noise (ceiling)']:.3f}",
            )
        )
    if "sliced_wasserstein" in m:
        sw = m["sliced_wasserstein"]
        rows.append(
            (
                f"sliced Wasserstein-1 (n = {sw['n']})",
                f"{sw['samples']:.4f}",
                f"floor: {sw['train_vs_held_out (floor)']:.4f}; ceiling: {sw['gaussian_noise (ceiling)']:.4f}",
            )
        )
    pc = m.get("per_class")
    if isinstance(pc, dict) and pc.get("mean"):
        mean, k = pc["mean"], len(pc["classes"])
        if "agreement" in mean:
            worst = pc["min_agreement"]
            rows.append(
                (
                    f"agreement with the requested class (mean over {k} classes)",
                    f"{mean['agreement']:.3f}",
                    f"lowest: {worst['agreement']:.3f} (class {worst['class']})",
                )
            )
        if "fd" in mean:
            rows.append(
                (
                    f"per-class Fréchet distance (mean over {k} classes)",
                    f"{mean['fd']:.3f}",
                    f"per-class floor (real held-out, n = {min(r['fd_n'] for r in pc['classes'].values())}): "
                    f"{mean['fd_floor']:.3f}; feature spread "
                    f"{mean['spread']:.3f} of the real class's",
                )
            )
        if "sliced_wasserstein" in mean:
            rows.append(
                (
                    f"per-class sliced Wasserstein-1 (mean over {k} classes)",
                    f"{mean['sliced_wasserstein']:.4f}",
                    f"floor: {mean['sliced_wasserstein_floor']:.4f}",
                )
            )
    v = m.get("test_vlb")
    if isinstance(v, dict):
        rows.append(
            (
                f"test VLB (bits/dim, {v['images']} held-out images, {v['bins']} levels)",
                f"{v['test_vlb_bpd']:.3f} (sigma^2 {v['variance']})",
                f"decoder term {v[v['variance']]['decoder_bpd']:.3f}, prior {v['prior_bpd']:.1e}",
            )
        )
    return rows


def metrics_table(m: dict) -> list[str]:
    """``metric_rows`` as the lines of a markdown table (for report.md)."""
    return ["| metric | samples | reference |", "|---|---|---|"] + [
        f"| {a} | {b} | {c} |" for a, b, c in metric_rows(m)
    ]


def format_metrics(m: dict) -> str:
    """A few human-readable lines of the headline metrics (the rows of report.md's table)."""
    lines = [f"{m.get('num_samples')} samples of {m.get('data')}"]
    lines += [f"{a}: {b} — {c}" for a, b, c in metric_rows(m)]
    return "\n".join(lines)


def guidance_table(rows: list) -> list[str]:
    """The guidance sweep (``guidance_sweep`` rows) as markdown lines: per scale s, the mean and
    lowest agreement, the mean per-class FD beside its floor, and the feature spread."""
    L = [
        "| guidance s | samples per class | agreement (mean) | agreement (lowest class) | per-class FD (mean) | "
        "per-class floor (mean) | feature spread |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["mean"]
        w = r.get("min_agreement", {})
        L.append(
            f"| {r['guidance']:g} | {r['per_class']} | {m.get('agreement', float('nan')):.3f} | "
            f"{w.get('agreement', float('nan')):.2f} (class {w.get('class')}) | {m.get('fd', float('nan')):.2f} | "
            f"{m.get('fd_floor', float('nan')):.2f} | {m.get('spread', float('nan')):.3f} |"
        )
    return L


def class_table(row: dict, uncond_fd: float | None = None) -> list[str]:
    """One guidance scale's per-class metrics as markdown lines, with the bound
    1.5 x floor + the unconditional FD when ``uncond_fd`` is given."""
    bound = uncond_fd is not None
    head = "| class | agreement | mean p(class) | FD | floor | spread |" + (
        " 1.5 x floor + FD_uncond | within |" if bound else ""
    )
    L = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, c in row["classes"].items():
        line = (
            f"| {name} | {c['agreement']:.2f} | {c['mean_prob']:.3f} | {c['fd']:.2f} | {c['fd_floor']:.2f} | "
            f"{c['spread']:.3f} |"
        )
        if bound:
            b = 1.5 * c["fd_floor"] + uncond_fd
            line += f" {b:.2f} | {'yes' if c['fd'] <= b else 'no'} |"
        L.append(line)
    return L


def guidance_report_lines(metrics: dict) -> list[str]:
    """report.md's section on a class-conditional demo: the 10-row grid, the guidance table
    and plot, and the per-class table at the default scale and at s = 1."""
    g = metrics["guidance"]
    fd_u = metrics.get("frechet_distance", {}).get("samples")
    L = ["## Asking for a class: classifier-free guidance", ""]
    L.append(
        f"One network is both models: trained with label dropout, it samples the unconditional model (the null "
        f"label, above) and each digit on request. eps = eps_u + s (eps_c - eps_u); the default s = {g['default']:g}. "
        f"Rows: digits 0-9 asked at s = {g['default']:g}, the first 10 samples of each."
    )
    L.append("")
    L.append("![one row per digit](classes.png)")
    L.append("")
    L.append(
        "Agreement: the fraction of the samples asked as a digit that the classifier reads as that digit. "
        "Per-class FD: the samples of a digit against its training digits in sets of n = 30 images (the mean over "
        "the sets), beside the floor (the digit's 30 held-out images against the same reference). Spread: "
        "tr Cov of the features of the samples / of the real digit (diversity)."
    )
    L.append("")
    L += guidance_table(g["scales"])
    L.append("")
    L.append("![agreement, FD and spread against s](guidance.png)")
    for s in dict.fromkeys([g["default"], 1.0]):
        row = next((r for r in g["scales"] if r["guidance"] == s), None)
        if row is None:
            continue
        L.append("")
        L.append(
            f"Per digit at s = {s:g} ({row['per_class']} samples each)"
            + (f"; the unconditional FD is {fd_u:.3f}" if fd_u is not None else "")
            + ":"
        )
        L.append("")
        L += class_table(row, fd_u)
    return L


def write_report(
    run, metrics: dict, config, sample_info: dict, timings: dict, trained_steps: int | None = None
) -> Path:
    """report.md in the run directory, linking samples.png, loss.png, schedule.png, metrics.json."""
    import platform

    from .checkpoint import read_run_config

    run = Path(run)
    rc = read_run_config(run)
    params = rc.get("model", {}).get("parameters")
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    L = ["# diffmath demo report", ""]
    L.append(
        f"Data: **{metrics['data']}** ({rc['data']['train']} training / {rc['data']['held_out']} held-out, shape "
        f"{tuple(rc['data']['shape'])}). Model: {rc['model']['class']} with {params:,} parameters, "
        f"{cfg['prediction']}-prediction, {cfg['schedule']} schedule, T = {cfg['timesteps']}, "
        f"{cfg['steps']} steps of batch {cfg['batch_size']}."
    )
    L.append("")
    steps = "adaptive" if sample_info.get("steps") is None else sample_info["steps"]
    L.append(
        f"Sampler: {sample_info['sampler']} with {steps} steps"
        + (f", eta = {sample_info['eta']}" if sample_info.get("eta") is not None else "")
        + f", {sample_info['num_samples']} samples, EMA weights of step {sample_info['step']}."
    )
    L.append("")
    L.append("## Metrics")
    L.append("")
    L += metrics_table(metrics)
    if "class_histogram" in metrics:
        L.append("")
        L.append(
            "Class histogram of the samples (classifier argmax, digits 0-9): "
            + ", ".join(map(str, metrics["class_histogram"]))
        )
        ci = metrics.get("classifier", {})
        L.append("")
        L.append(
            f"Classifier: {ci.get('kind')}; held-out accuracy {ci.get('held_out_accuracy', float('nan')):.3f}. "
            "The Fréchet distance compares Gaussians fitted to its last hidden layer on the real training digits "
            "and on each set."
        )
    if isinstance(metrics.get("guidance"), dict):
        L.append("")
        L += guidance_report_lines(metrics)
    L.append("")
    L.append("## Figures")
    L.append("")
    L.append(
        "Samples"
        + (" of the unconditional model (null label)" if "guidance" in metrics else "")
        + ": ![samples](samples.png)"
    )
    L.append("")
    L.append("Training loss: ![loss](loss.png)")
    L.append("")
    L.append("Noise schedule: ![schedule](schedule.png)")
    L.append("")
    L.append("All numbers: [metrics.json](metrics.json); configuration: [config.json](config.json).")
    L.append("")
    L.append("## Timings")
    L.append("")
    note = "" if trained_steps is None else f" ({trained_steps} steps trained in this call)"
    guid = f", guidance table {timings['guidance_s']} s" if "guidance_s" in timings else ""
    load = timings.get("load_avg_1min")
    load = f" (1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end)" if load else ""
    L.append(
        f"train {timings.get('train_s')} s{note}, sample {timings.get('sample_s')} s, evaluate "
        f"{timings.get('evaluate_s')} s"
        f"{guid}, total {timings.get('total_s')} s{load}"
        + (f", {timings['cpu_s']} s of CPU time" if "cpu_s" in timings else "")
        + f" on {platform.machine()} with {os.cpu_count()} CPU(s) visible; torch "
        f"{torch.__version__}, torch threads: {torch.get_num_threads()}, device: "
        f"{timings.get('device', cfg.get('device'))}."
    )
    path = run / "report.md"
    atomic_write_text(path, L)
    return path
