"""The paper's numbers each finding is set beside (MetaMorph, Tong et al. 2024, appendix B;
/work/shared/paper). FID: lower is better; CLIP score and VQA average: higher is better.
The paper's amounts are in samples; ours are records of the Shapes world, so runs are
paired with the paper's rows by rank (the i-th amount with the i-th listed here), which the
report states.
"""
from __future__ import annotations

SOURCE = "MetaMorph (Tong et al., 2024), appendix B"

# Table 4 (Fig. 2/3): generation-only vs joint training, FID on COCO-30K, by generation
# samples. (The table lists 200k twice, 15.2 / 110.7 and 14.7 / 93.7; the first is kept.)
TABLE4 = {"ref": "Table 4 (Fig. 2)", "metric": "FID (lower is better)",
          "amounts": (1_000, 5_000, 10_000, 50_000, 200_000, 1_000_000, 3_000_000, 5_000_000),
          "joint": (68.5, 19.2, 18.7, 17.1, 15.2, 14.4, 15.1, 14.3),
          "generation_only": (115.0, 116.4, 111.0, 111.8, 110.7, 52.8, 39.2, 27.7)}

# Table 5 (Fig. 3): 200k generation samples joint-trained with one other kind.
TABLE5 = {"ref": "Table 5 (Fig. 3)", "metric": "FID (lower is better)", "generation": 200_000,
          "fid": {"none": 110.5, "image_to_image": 97.5, "visual_thinking": 93.5, "video": 84.7,
                  "video_qa": 26.5, "image_qa": 18.9},
          "clip": {"none": 5.7, "image_to_image": 6.4, "visual_thinking": 6.5, "video": 8.1,
                   "video_qa": 16.1, "image_qa": 22.0}}

# Table 6 (Fig. 7 heatmaps): VQA data x generation data; (average VQA, FID, CLIP).
TABLE6_VQA = (1_000_000, 4_000_000, 7_000_000)
TABLE6_GENERATION = (200_000, 500_000, 1_000_000, 2_000_000, 3_000_000, 4_000_000)
TABLE6 = {"ref": "Table 6 (Fig. 7)", "vqa_amounts": TABLE6_VQA,
          "generation_amounts": TABLE6_GENERATION,
          "vqa_average": ((46.4, 48.2, 49.1, 49.9, 51.1, 51.4),
                          (53.8, 53.3, 54.2, 53.8, 54.3, 54.4),
                          (55.8, 55.6, 55.8, 55.4, 55.6, 56.2)),
          "fid": ((28.3, 28.1, 27.3, 23.1, 21.1, 18.4),
                  (21.4, 16.0, 16.0, 15.6, 16.1, 15.3),
                  (18.2, 15.2, 14.5, 14.8, 14.2, 14.9)),
          "clip": ((15.2, 15.9, 16.5, 17.8, 21.1, 22.3),
                   (20.5, 24.8, 24.8, 24.7, 24.8, 25.5),
                   (22.3, 25.5, 26.6, 27.1, 27.5, 26.3))}

# Table 7 (Fig. 6): 7M VQA + 1M generation on three LLMs.
TABLE7 = {"ref": "Table 7 (Fig. 6)",
          "rows": {"LLaMA-3 8B": {"vqa_average": 55.8, "fid": 14.5, "clip": 26.6},
                   "LLaMA-3.1 8B": {"vqa_average": 56.7, "fid": 13.2, "clip": 27.1},
                   "LLaMA-3 70B": {"vqa_average": 60.7, "fid": 13.8, "clip": 26.8}}}

# Figs. 9-10: knowledge and reasoning reach generation; examples only, no numbers.
FIG9_10 = {"ref": "Figs. 9-10", "claim": "MetaMorph generates images of concepts that need "
           "the LLM's knowledge ('Chhogori', 'Oncilla') and of puzzles ('the animal resulting "
           "from a monarch caterpillar's metamorphosis' -> a butterfly); qualitative, no "
           "numbers"}


def rank_matched(amounts, paper_amounts) -> dict:
    """{our amount: the paper's amount of the same rank}; ours must not outnumber the
    paper's (the smallest of ours with the paper's smallest, and so on, spread over the
    paper's list when ours are fewer: first, last and evenly between)."""
    amounts = list(amounts)
    if len(amounts) > len(paper_amounts):
        raise ValueError(f"{len(amounts)} amounts, but the paper has only {len(paper_amounts)}")
    if len(amounts) == 1:
        return {amounts[0]: paper_amounts[0]}
    last = len(paper_amounts) - 1
    return {amount: paper_amounts[round(i * last / (len(amounts) - 1))]
            for i, amount in enumerate(sorted(amounts))}
