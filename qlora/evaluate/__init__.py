"""Evaluation: perplexity, zero-shot multiple choice, MMLU, the data-type study, generation for a
prompt set, pairwise judging with an Elo tournament, and adapter-vs-adapter comparison.

    scoring      log P(continuation | context), batched: the primitive under choice/mmlu/judge
    perplexity   windows over one token stream          choice   acc / acc_norm (lm-eval-harness)
    mmlu         5-shot, A/B/C/D letter logits          datatypes  the paper's Figure 3 for any model
    generation   answers JSONL for a prompt set         judge    API / local model / human judges
    pairwise     both-order judging, to Elo matches     elo      Elo over many random match orders
    compare      paired bootstrap of A - B              report   markdown tables, JSON files
"""

from .choice import ChoiceResult, Question, evaluate_choice, load_task
from .compare import paired_bootstrap
from .elo import Match, elo_once, elo_tournament, win_table
from .judge import ChatJudge, HumanJudge, LocalJudge, Verdict
from .mmlu import evaluate_mmlu, load_mmlu
from .pairwise import Judgment, judge_all, tournament
from .perplexity import Perplexity, perplexity, tokenize
from .scoring import Score, loglikelihood

__all__ = [
    "ChatJudge", "ChoiceResult", "HumanJudge", "Judgment", "LocalJudge", "Match", "Perplexity", "Question", "Score",
    "Verdict", "elo_once", "elo_tournament", "evaluate_choice", "evaluate_mmlu", "judge_all", "load_mmlu", "load_task",
    "loglikelihood", "paired_bootstrap", "perplexity", "tokenize", "tournament", "win_table",
]
