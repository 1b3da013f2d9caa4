"""Teacher LLMs for annotate.py: a local causal LM through transformers, or an OpenAI-compatible HTTP endpoint.

A teacher is built with `samples` (K), `temperature` and `top_p`, is called with a list of prompts and a progress
callback (told how many prompts finished), and returns K continuations per prompt, always as a list (of one for
K = 1): the text after the prompt, cut at the first stop sequence, leading whitespace dropped (as in PaLM's files).
Temperature 0 is greedy decoding.
"""

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

Progress = Callable[[int], None]
Teacher = Callable[[list[str], Progress], list[list[str]]]
MAX_RETRY_WAIT = 60.0  # seconds; the cap on exponential backoff


class TeacherError(Exception):
    """The teacher could not be loaded or answered unusably; its message says what to do."""


def cut_at_stop(text: str, stops: list[str]) -> str:
    for stop in stops:
        text = text.split(stop)[0]
    return text.lstrip()


class HFTeacher:
    """A local causal LM: greedy (temperature 0) or sampled, batched with left padding (so every continuation starts
    at the same column), bf16 on GPU, spread over the visible GPUs when it does not fit on one. Sampling draws from
    torch's generator, seeded once with `seed`, so a run from scratch repeats."""

    def __init__(
        self, model: str, batch_size: int, max_new_tokens: int, stops: list[str],
        samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cuda = torch.cuda.is_available()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
            self.model = AutoModelForCausalLM.from_pretrained(
                model, dtype=torch.bfloat16 if cuda else torch.float32, device_map="auto" if cuda else None
            )
        except (OSError, ValueError) as e:
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TeacherError(f"could not load --model {model!r} ({first_line}); pass a local directory holding a "
                               "saved causal LM and tokenizer, or a reachable hub id") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.eval()
        self.batch_size, self.max_new_tokens, self.stops = batch_size, max_new_tokens, stops
        self.samples = samples
        # top_k=0 switches off a top-k cut the model's generation config may set: only temperature and top_p shape
        # the distribution, as for the HTTP teacher.
        self.decoding = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0, "num_return_sequences": samples}
            if temperature > 0
            else {"do_sample": False}
        )
        torch.manual_seed(seed)

    def __call__(self, prompts: list[str], progress: Progress) -> list[list[str]]:
        import torch

        outputs = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            encoded = self.tokenizer(batch, return_tensors="pt", padding=True, return_token_type_ids=False)
            encoded = encoded.to(self.model.device)
            with torch.inference_mode():
                ids = self.model.generate(
                    **encoded, **self.decoding, max_new_tokens=self.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id, stop_strings=self.stops or None, tokenizer=self.tokenizer,
                )
            texts = self.tokenizer.batch_decode(ids[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
            texts = [cut_at_stop(text, self.stops) for text in texts]
            # generate returns each prompt's samples next to each other.
            outputs += [texts[start : start + self.samples] for start in range(0, len(texts), self.samples)]
            progress(len(batch))
        return outputs


class OpenAITeacher:
    """An OpenAI-compatible endpoint (/v1/completions, or /v1/chat/completions with chat=True): one request per
    prompt, `concurrency` in flight, 429/5xx/timeouts/dropped connections retried with exponential backoff."""

    def __init__(
        self, base_url: str, model: str, chat: bool, api_key: str | None, max_new_tokens: int, stops: list[str],
        concurrency: int, timeout: float, max_retries: int, retry_wait: float,
        samples: int = 1, temperature: float = 0.0, top_p: float = 1.0,
    ):
        base = base_url.rstrip("/")
        base = base if base.endswith("/v1") else base + "/v1"
        self.url = base + ("/chat/completions" if chat else "/completions")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.model, self.chat, self.max_new_tokens, self.stops = model, chat, max_new_tokens, stops
        self.concurrency, self.timeout = concurrency, timeout
        self.max_retries, self.retry_wait = max_retries, retry_wait
        self.samples, self.temperature, self.top_p = samples, temperature, top_p

    def __call__(self, prompts: list[str], progress: Progress) -> list[list[str]]:
        pool = ThreadPoolExecutor(self.concurrency)
        try:
            # K samples as K requests, which every server answers (not all support `n`).
            futures = [[pool.submit(self.complete, prompt) for _ in range(self.samples)] for prompt in prompts]
            prompt_of = {future: i for i, per_prompt in enumerate(futures) for future in per_prompt}
            left = [self.samples] * len(prompts)
            for future in as_completed(prompt_of):
                future.result()
                left[prompt_of[future]] -= 1
                if not left[prompt_of[future]]:
                    progress(1)
        finally:
            pool.shutdown(cancel_futures=True)
        return [[future.result() for future in per_prompt] for per_prompt in futures]

    def complete(self, prompt: str) -> str:
        body = {"model": self.model, "max_tokens": self.max_new_tokens, "temperature": self.temperature}
        if self.top_p < 1.0:
            body["top_p"] = self.top_p
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.stops:
            body["stop"] = self.stops
        answer = self._post(body)
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"] if self.chat else choice["text"]
        except (KeyError, IndexError, TypeError):
            field = "message.content" if self.chat else "text"
            raise TeacherError(f"{self.url} answered without choices[0].{field}: {json.dumps(answer)[:200]}") from None
        return cut_at_stop(text or "", self.stops)

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode("utf-8")
        error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.retry_wait * 2 ** (attempt - 1), MAX_RETRY_WAIT))
            request = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    detail = e.read().decode("utf-8", "replace")[:200]
                    raise TeacherError(f"{self.url} answered {e.code} {e.reason}: {detail}; check --model, "
                                       "--base_url and the API key") from None
                error = f"HTTP {e.code} {e.reason}"
                continue
            except (TimeoutError, urllib.error.URLError, ConnectionError, http.client.HTTPException) as e:
                error = str(getattr(e, "reason", e)) or type(e).__name__
                continue
            try:
                return json.loads(payload)
            except json.JSONDecodeError:
                raise TeacherError(f"{self.url} answered with something other than JSON: {payload[:200]!r}") from None
        raise TeacherError(f"{self.url}: no answer after {self.max_retries + 1} attempts (last: {error}); is the "
                           "server up? raise --timeout or --max_retries")
