"""Write the bundled sample files: a few dozen rows per dataset, in the real datasets' schemas.

The rows are written for this project (templated, seeded), not copied from the datasets, so the tests and
configs/tiny.yaml run after a plain install with no network (the real data is ``samples/real/``: make_real.py).
Regenerate with ``python -m fff_lightning.data.make_samples``;
a test checks that the shipped files are this script's output.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SAMPLES = Path(__file__).parent / "samples"
N_ROWS = 40


def magicoder(rng: random.Random, i: int) -> dict:
    name, op, word = rng.choice(
        [
            ("sum_list", "sum(xs)", "sum"),
            ("max_list", "max(xs)", "largest value"),
            ("min_list", "min(xs)", "smallest value"),
            ("count_even", "sum(1 for x in xs if x % 2 == 0)", "number of even values"),
            ("mean_list", "sum(xs) / len(xs)", "arithmetic mean"),
        ]
    )
    lang = rng.choice(["python", "python", "rust", "typescript"])
    xs = [rng.randint(-9, 30) for _ in range(rng.randint(3, 6))]
    problem = (
        f"You are given a list of integers. Write a function `{name}` that returns the {word} of the list.\n\n"
        f"For example, `{name}({xs})` should return `{eval(op, {'xs': xs})}`."
    )
    if lang == "python":
        solution = (
            f"```python\ndef {name}(xs: list[int]):\n    return {op}\n```\n\nThe function uses Python built-ins, "
            f"so it runs in linear time."
        )
    elif lang == "rust":
        body = {
            "sum_list": "xs.iter().sum::<i64>() as f64",
            "max_list": "*xs.iter().max().unwrap() as f64",
            "min_list": "*xs.iter().min().unwrap() as f64",
            "count_even": "xs.iter().filter(|x| *x % 2 == 0).count() as f64",
            "mean_list": "xs.iter().sum::<i64>() as f64 / xs.len() as f64",
        }[name]
        solution = f"```rust\nfn {name}(xs: &[i64]) -> f64 {{\n    {body}\n}}\n```\n\nIt iterates once over the slice."
    else:
        body = {
            "sum_list": "xs.reduce((a, b) => a + b, 0)",
            "max_list": "Math.max(...xs)",
            "min_list": "Math.min(...xs)",
            "count_even": "xs.filter((x) => x % 2 === 0).length",
            "mean_list": "xs.reduce((a, b) => a + b, 0) / xs.length",
        }[name]
        solution = f"```typescript\nfunction {name}(xs: number[]): number {{\n  return {body};\n}}\n```\n\nOne pass over the array."
    return {
        "lang": lang,
        "raw_index": 1000 + i,
        "index": i,
        "seed": f"# seed snippet {i}\n{name} = None",
        "openai_fingerprint": "fp_fff_sample",
        "problem": problem,
        "solution": solution,
    }


def metamath(rng: random.Random, i: int) -> dict:
    a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
    kind = rng.choice(["GSM_Rephrased", "MATH_AnsAug", "GSM_AnsAug", "MATH_Rephrased"])
    item = rng.choice(["apples", "books", "marbles", "pencils", "stamps"])
    question = f"Tom has {a} {item}. He buys {b} more and then gives away a third of {c * 3} {item}. How many {item} does he have?"
    total = a + b - c
    response = (
        f"Tom starts with {a} {item} and buys {b} more, so he has {a} + {b} = {a + b}.\n"
        f"A third of {c * 3} is {c}, so he gives away {c}.\nHe has {a + b} - {c} = {total} {item} left.\n"
        f"The answer is: {total}"
    )
    return {"type": kind, "query": question, "original_question": question, "response": response}


TOPICS = [
    (
        "How do I keep basil alive indoors?",
        "Give it at least six hours of sun, water when the top soil is dry, and pinch off flowers.",
    ),
    (
        "What is a good way to learn a new language?",
        "Practise a little every day, speak early, and read things you enjoy.",
    ),
    (
        "Can you explain what a budget is?",
        "A budget is a plan that matches the money you expect to earn with what you expect to spend.",
    ),
    (
        "Why is the sky blue?",
        "Air scatters short blue wavelengths of sunlight more than red ones, so blue light reaches us from all directions.",
    ),
    (
        "How should I prepare for a job interview?",
        "Research the company, practise answers to common questions, and prepare questions of your own.",
    ),
    (
        "What makes a good night's sleep?",
        "A regular schedule, a dark and cool room, and no screens in the last hour before bed.",
    ),
]
FOLLOW_UPS = [
    ("Can you say more?", "Sure. Small steady habits matter more than rare big efforts."),
    ("Thanks! Anything to avoid?", "Avoid doing too much at once; change one thing and see how it goes."),
    ("Could you summarise that in one sentence?", "Keep it simple, consistent, and adjust as you learn."),
]


def ultrachat(rng: random.Random, i: int) -> dict:
    q, a = rng.choice(TOPICS)
    messages = []
    if i % 7 == 3:
        messages.append({"role": "system", "content": "You are a concise, friendly assistant."})
    messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for fq, fa in rng.sample(FOLLOW_UPS, k=rng.randint(0, 2)):
        messages += [{"role": "user", "content": fq}, {"role": "assistant", "content": fa}]
    return {"prompt": q, "prompt_id": f"{i:064x}", "messages": messages}


def artificial_thinker(rng: random.Random, i: int) -> dict:
    x, y = rng.randint(3, 12), rng.randint(3, 12)
    prompt = f"A rectangle is {x} cm wide and {y} cm long. What is its area and its perimeter?"
    reasoning = (
        f"The area of a rectangle is width times length: {x} * {y} = {x * y}. "
        f"The perimeter is twice the sum of the sides: 2 * ({x} + {y}) = {2 * (x + y)}."
    )
    response = f"The area is {x * y} square centimetres and the perimeter is {2 * (x + y)} cm."
    return {"prompt": prompt, "reasoning": reasoning, "response": response}


MAKERS = {
    "magicoder": magicoder,
    "metamath": metamath,
    "ultrachat": ultrachat,
    "artificial_thinker": artificial_thinker,
}


def rows(name: str) -> list[dict]:
    rng = random.Random(f"fff-samples-{name}")
    return [MAKERS[name](rng, i) for i in range(N_ROWS)]


def render(name: str) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows(name))


def main() -> None:
    SAMPLES.mkdir(parents=True, exist_ok=True)
    for name in MAKERS:
        (SAMPLES / f"{name}.jsonl").write_text(render(name))
        print(f"wrote {SAMPLES / name}.jsonl ({N_ROWS} rows)")


if __name__ == "__main__":
    main()
