import time, json, sys
t0=time.time()
from fff_lightning.run_config import describe_run
run = sys.argv[1]
described = describe_run("/work/main/configs/tiny.yaml", overrides=[f"--model.adapter_path={run}/adapter"])
m = described.model
m.configure_model()
model, tok = m.model, m.tokenizer
model.eval()
print("loaded", round(time.time()-t0,1), type(model).__name__)
import lm_eval
from lm_eval.models.huggingface import HFLM
lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu", max_length=512)
math = "/work/main/fff_lightning/data/samples/real/math/validation.jsonl"
task = {
  "task": "fff_math", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": math}},
  "test_split": "test", "output_type": "generate_until",
  "doc_to_text": "Question: {{query}}\nAnswer:", "doc_to_target": "{{response.split('#### ')[-1]}}",
  "generation_kwargs": {"until": ["Question:", "\n\n"], "do_sample": False, "max_gen_toks": 32},
  "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
  "filter_list": [{"name": "flexible", "filter": [{"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{1,})"}, {"function": "take_first"}]}],
}
ll = {
  "task": "fff_math_ll", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": math}},
  "test_split": "test", "output_type": "loglikelihood",
  "doc_to_text": "Question: {{query}}\nAnswer:", "doc_to_target": " {{response}}",
  "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}
t1=time.time()
res = lm_eval.simple_evaluate(model=lm, tasks=[task, ll], limit=4, log_samples=True, random_seed=0)
print("eval", round(time.time()-t1,1))
print(json.dumps(res["results"], indent=1, default=str)[:1500])
print(list(res["samples"]["fff_math"][0].keys()))
