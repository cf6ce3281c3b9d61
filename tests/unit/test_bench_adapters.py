"""fluxserve-bench adapters: its arithmetic and its report, on made-up figures (the run itself is
a benchmark: `fluxserve-bench adapters`)."""

from __future__ import annotations

import torch

from benchmarks.adapters import _ratios, branch_mac_share, render_markdown


class _Block(torch.nn.Module):
    def __init__(self, dim: int, mlp: int) -> None:
        super().__init__()
        self.to_q = torch.nn.Linear(dim, dim)
        self.proj_mlp = torch.nn.Linear(dim, mlp)
        self.norm = torch.nn.Module()
        self.norm.linear = torch.nn.Linear(dim, 3 * dim)  # modulation: once per row, not per token


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([_Block(8, 32)])
        self.single_transformer_blocks = torch.nn.ModuleList([_Block(8, 32)])


def test_branch_mac_share_counts_per_token_linears() -> None:
    model = _Model()
    branch = ["transformer_blocks.0.to_q", "single_transformer_blocks.0.to_q"]
    # per token: double block counts half (one stream), single block whole; modulation left out
    base = 0.5 * (8 * 8 + 8 * 32) + (8 * 8 + 8 * 32)
    extra = 0.5 * 2 * (8 + 8) + 2 * (8 + 8)
    assert branch_mac_share(model, branch, rank=2) == extra / base


def test_ratios_are_medians_over_the_plain_graph() -> None:
    steps = {
        name: {"median_ms": ms}
        for name, ms in {
            "int8/plain": 100.0,
            "int8/grouped/slot0": 110.0,
            "int8/grouped/one": 112.0,
            "int8/grouped/distinct": 116.0,
        }.items()
    }
    r = _ratios(steps, ("int8",), ("grouped",))
    assert r == {
        "int8/grouped/slot0": 1.1,
        "int8/grouped/one": 1.12,
        "int8/grouped/distinct": 1.16,
        "int8/grouped/distinct_vs_one": round(116 / 112, 3),
    }


def test_report_shows_both_clocks_the_goal_and_memory() -> None:
    names = ("fp32/plain", "fp32/grouped/slot0", "fp32/grouped/one", "fp32/grouped/distinct")
    steps = {name: {"median_ms": 100.0 + i} for i, name in enumerate(names)}
    ratios = _ratios(steps, ("fp32",), ("grouped",))
    result = {
        "started_utc": "2026-01-01 00:00 UTC",
        "settings": {"rank": 16, "layouts": ["grouped"], "threads": 1, "repeats": 3},
        "step": {"batch": 4, "image_side": 256, "image_tokens": 256, "text_len": 64},
        "exports": {"grouped": {"bank_inputs": 6, "branch_layers": 72}},
        "steps": {"cpu": steps, "wall": steps},
        "ratios_vs_plain": {"cpu": ratios, "wall": ratios},
        "goal_max_ratio": 1.15,
        "branch_mac_share": {"measured_model": 0.049, "flux1_dev": 0.006},
        "memory": {
            "layout": "grouped",
            "slots": 8,
            "slot_bytes": 2**20,
            "adapter_tensor_bytes": [2**20],
            "adapter_file_bytes": [2**20],
            "rss_growth_bytes": [2**20, 2**20],
        },
        "background_load_at_start": {"cpu_busy_fraction": 0.0},
        "background_load_at_end": {"cpu_busy_fraction": 0.1},
    }
    md = render_markdown(result)
    assert "| fp32 | grouped (6 inputs) | 100 | 101 (1.01×) | 102 (1.02×) | 103 (1.03×) | 1.01× |" in md
    assert md.count("| precision | bank layout |") == 2  # CPU and wall tables
    assert "≤ 1.15×" in md and "4.9% on this model, 0.6% at FLUX.1-dev" in md
    assert "RSS growth per adapter loaded: 1.00, 1.00 MiB" in md
