"""Seconds per optimizer step (batch 8, real BoolQ rows) for LoRA layer ranges, alternating configs.

From the repository root: PYTHONPATH=. python THIS_FILE 'all={"target_modules":["all-linear"]}' 'top20={"target_modules":["all-linear"],"layers":list(range(10,30))}' ...
"""
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from heft_common.vocabulary import EMBEDDED_MODEL as ref
from heft_core import data as hdata
from heft_core import models
from heft_core.adapters import PlainAnswerModel, build_lora_model
from heft_core.batching import collate, length_grouped_batches
from heft_core.config import LoraSettings
from heft_core.prompt import PromptEncoder, PromptTemplate

tok = models.load_tokenizer(ref)
splits = hdata.load_data(str(hdata.local_boolq_dir()), seed=42)
enc = PromptEncoder(tok, PromptTemplate(), 256)
train = enc.encode_examples(hdata.subset(splits.train, 1500, 42))
print("mean tokens", statistics.mean(len(e.input_ids) for e in train))
batches = length_grouped_batches(train, 8, random.Random(0))
pad = tok.pad_token_id if tok.pad_token_id is not None else 0
configs = {name: eval(spec) for name, spec in (a.split("=", 1) for a in sys.argv[1:])}
built = {}
for name, kw in configs.items():
    base = models.load_model(ref)
    m = build_lora_model(base, LoraSettings(**kw), 30)
    am = PlainAnswerModel(m)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    built[name] = (am, opt)
targets = torch.tensor([enc.no_id, enc.yes_id])
times = {n: [] for n in configs}
for rnd in range(4):
    for name in configs:
        am, opt = built[name]
        am.train()
        for b in batches[rnd * 2 + 5: rnd * 2 + 7]:
            batch = collate(b, pad)
            t = time.perf_counter()
            loss = F.cross_entropy(am.answer_logits(batch).float(), targets[batch.labels])
            loss.backward()
            opt.step()
            opt.zero_grad()
            dt_ = time.perf_counter() - t
            if rnd > 0:  # round 0 is warmup
                times[name].append(dt_ / batch.num_tokens * 1000)
for n, ts in times.items():
    print(f"{n}: {statistics.median(ts):.2f} ms/token -> {1000/statistics.median(ts):.0f} tok/s")
