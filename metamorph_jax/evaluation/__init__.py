"""Evaluation: text loss (text_loss.py); benchmark readers, prompts, scoring, resumable
predictions and results (readers, prompts, answers, scoring, results, predictions, runner);
generation metrics (fid, clip_score, captions). See docs/design.md."""
