"""Teacher LLMs for annotate.py: a local causal LM through transformers, or an OpenAI-compatible HTTP endpoint.

A teacher is built with `samples` (K), `temperature` and `top_p`, is called with a list of prompts and a progress
callback (told how many prompts finished), and returns K continuations per prompt, always as a list (of one for
K = 1): the text after the prompt, cut at the first stop sequence, leading whitespace dropped (as in PaLM's files).
Temperature 0 is greedy decoding.

After each call, `requests` holds what each request of it cost (request_record): the prompts it carried (their
positions in the call's list), prompt and completion tokens, seconds and attempts.
"""

import asyncio
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx2  # the HTTP library under the openai client
import openai

from cli import first_line

Progress = Callable[[int], None]
Teacher = Callable[[list[str], Progress], list[list[str]]]

# The most bytes an answer may hold: per generated token, room for any vocabulary's longest token written as JSON
# escapes; plus the JSON around the choices (ids, usage, finish reasons) and the prompt, which some servers echo,
# at 12 bytes a character (a character outside the BMP is two \uXXXX escapes).
ANSWER_BYTES_PER_TOKEN = 1024
ANSWER_ENVELOPE_BYTES = 64 * 1024
ESCAPED_BYTES_PER_CHARACTER = 12


def request_record(rows: list[int], prompt_tokens: int | None, completion_tokens: int | None, seconds: float,
                   attempts: int) -> dict:
    """What one request cost: the prompts it carried (positions in the call's list), its prompt and completion
    tokens (None where the server reported none), its seconds from first sending to the whole answer (retries and
    backoff included) and its attempts (1 + retries)."""
    return {"rows": rows, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "seconds": seconds, "attempts": attempts}


class TeacherError(Exception):
    """The teacher could not be loaded or answered unusably; its message says what to do."""


def cut_at_stop(text: str, stops: list[str]) -> str:
    for stop in stops:
        text = text.split(stop)[0]
    return text.lstrip()


class AnswerTooLarge(Exception):
    """An answer outgrew its byte limit while it arrived; not an httpx error, so the openai client does not retry it
    (the same request would bring the same answer)."""


def answer_byte_limit(max_new_tokens: int, samples: int, longest_prompt: int) -> int:
    """The most bytes one answer of `samples` continuations of at most `max_new_tokens` tokens may take, for prompts
    of at most `longest_prompt` characters."""
    return (ANSWER_ENVELOPE_BYTES + ESCAPED_BYTES_PER_CHARACTER * longest_prompt
            + ANSWER_BYTES_PER_TOKEN * max_new_tokens * samples)


class BoundedHTTPClient(openai.DefaultAsyncHttpxClient):
    """The openai client's HTTP client with two limits on every attempt at a request: `deadline` seconds from
    sending it to the answer's last byte, so a server that trickles bytes cannot hold a request longer (the expiry is
    a timeout, which the openai client retries); and `max_bytes` of answer, counted as it arrives, so a huge answer is
    refused (AnswerTooLarge) before it fills memory. The answer is always read whole before it is returned."""

    def __init__(self, deadline: float, max_bytes: int, **kwargs):
        super().__init__(**kwargs)
        self.deadline, self.max_bytes = deadline, max_bytes

    async def send(self, request: httpx2.Request, *, stream: bool = False, **kwargs) -> httpx2.Response:
        scope = asyncio.timeout(self.deadline)
        try:
            async with scope:
                response = await super().send(request, stream=True, **kwargs)
                try:
                    body = await self._bounded_body(response)
                finally:
                    await response.aclose()
        except TimeoutError:
            if not scope.expired():
                raise
            raise httpx2.ReadTimeout(f"no whole answer within {self.deadline:g} s", request=request) from None
        # The body is decoded already: the headers that described its transfer no longer apply.
        transfer = ("content-encoding", "content-length", "transfer-encoding")
        headers = [(name, value) for name, value in response.headers.multi_items() if name.lower() not in transfer]
        return httpx2.Response(response.status_code, headers=headers, content=body, request=request,
                               extensions=response.extensions)

    async def _bounded_body(self, response: httpx2.Response) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise AnswerTooLarge(f"announced {int(declared)} bytes")
        body = bytearray()
        async for part in response.aiter_bytes():
            body += part
            if len(body) > self.max_bytes:
                raise AnswerTooLarge(f"sent more than {self.max_bytes} bytes")
        return bytes(body)


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
            raise TeacherError(f"could not load --model {model!r} ({first_line(e)}); pass a local directory holding a "
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
        self.requests: list[dict] = []

    def __call__(self, prompts: list[str], progress: Progress) -> list[list[str]]:
        """Every prompt's continuations, batch by batch; each batch is one request in `requests`, its tokens
        counted with the teacher's tokenizer: the prompts' tokens, and the generated tokens other than padding (a
        continuation that ended early is padded to the batch's longest)."""
        import torch

        outputs, self.requests = [], []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            began = time.perf_counter()
            encoded = self.tokenizer(batch, return_tensors="pt", padding=True, return_token_type_ids=False)
            encoded = encoded.to(self.model.device)
            with torch.inference_mode():
                ids = self.model.generate(
                    **encoded, **self.decoding, max_new_tokens=self.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id, stop_strings=self.stops or None, tokenizer=self.tokenizer,
                )
            generated = ids[:, encoded["input_ids"].shape[1] :]
            self.requests.append(request_record(
                list(range(start, start + len(batch))), int(encoded["attention_mask"].sum()),
                int((generated != self.tokenizer.pad_token_id).sum()), time.perf_counter() - began, 1,
            ))
            texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            texts = [cut_at_stop(text, self.stops) for text in texts]
            # generate returns each prompt's samples next to each other.
            outputs += [texts[start : start + self.samples] for start in range(0, len(texts), self.samples)]
            progress(len(batch))
        return outputs


@contextmanager
def ctrl_c_cancels(task: asyncio.Task, interrupted: threading.Event) -> Iterator[None]:
    """Ctrl-C cancels `task` at once (and sets `interrupted`), through the event loop's own signal handler.

    asyncio.run's handler is a plain Python one: it runs when the main thread next runs Python code. The kernel may
    deliver the signal to any thread (the HTTP stack's, tqdm's), and then nothing wakes the main thread while the
    loop waits on sockets that never answer. The loop's handler writes to the loop's wakeup pipe, so the loop runs
    it at once. Outside the main thread signals cannot be caught, and asyncio.run's handling stays."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()

    def cancel() -> None:
        interrupted.set()
        task.cancel()

    loop.add_signal_handler(signal.SIGINT, cancel)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


class OpenAITeacher:
    """An OpenAI-compatible endpoint (/v1/completions, or /v1/chat/completions with chat=True) through the official
    `openai` client: an attempt at a request times out `timeout` seconds after it was sent unless its answer has
    arrived whole, and an answer longer than answer_byte_limit allows is refused as it arrives (BoundedHTTPClient);
    408/409/429/5xx, timeouts and dropped connections are retried `max_retries` times with exponential backoff (or
    after the server's Retry-After), and connections are reused. `concurrency` prompts are in flight at once. Answers
    that are not UTF-8, not JSON, or hold no text where the continuation belongs are refused, never stored.

    `samples` continuations per prompt are asked for with `n`; from a server that ignores or refuses `n`, one
    request per continuation.
    """

    def __init__(
        self, base_url: str, model: str, chat: bool, api_key: str | None, max_new_tokens: int, stops: list[str],
        concurrency: int, timeout: float, max_retries: int, *, samples: int = 1, temperature: float = 0.0,
        top_p: float = 1.0,
    ):
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.url = self.base_url + ("/chat/completions" if chat else "/completions")
        self.api_key = api_key
        self.model, self.chat, self.max_new_tokens, self.stops = model, chat, max_new_tokens, stops
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.samples, self.temperature, self.top_p = samples, temperature, top_p
        self.server_takes_n = True
        self.requests: list[dict] = []

    def __call__(self, prompts: list[str], progress: Progress) -> list[list[str]]:
        """Every prompt's continuations, in order. The first unusable answer, or Ctrl-C (KeyboardInterrupt),
        cancels the requests still in flight and their retries."""
        interrupted = threading.Event()
        self.requests = []
        try:
            return asyncio.run(self._complete_all(prompts, progress, interrupted))
        except asyncio.CancelledError:
            if interrupted.is_set():
                raise KeyboardInterrupt from None
            raise

    async def _complete_all(self, prompts: list[str], progress: Progress, interrupted: threading.Event
                            ) -> list[list[str]]:
        with ctrl_c_cancels(asyncio.current_task(), interrupted):
            return await self._complete_all_now(prompts, progress)

    async def _complete_all_now(self, prompts: list[str], progress: Progress) -> list[list[str]]:
        self.max_answer_bytes = answer_byte_limit(self.max_new_tokens, self.samples, max(map(len, prompts), default=0))
        http_client = BoundedHTTPClient(self.timeout, self.max_answer_bytes, timeout=self.timeout)
        async with openai.AsyncOpenAI(
            # Without a key no Authorization header is sent (see _request); the client insists on some key.
            base_url=self.base_url, api_key=self.api_key or "none", timeout=self.timeout, max_retries=self.max_retries,
            http_client=http_client,
        ) as client:
            slots = asyncio.Semaphore(self.concurrency)

            async def complete(row: int, prompt: str) -> list[str]:
                async with slots:
                    return await self._samples(client, row, prompt)

            tasks = [asyncio.create_task(complete(row, prompt)) for row, prompt in enumerate(prompts)]
            try:
                for finished in asyncio.as_completed(tasks):
                    await finished
                    progress(1)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            return [task.result() for task in tasks]

    async def _samples(self, client: openai.AsyncOpenAI, row: int, prompt: str) -> list[str]:
        """`samples` continuations of the prompt at position `row`, in as few requests as the server allows."""
        texts: list[str] = []
        while len(texts) < self.samples:
            wanted = self.samples - len(texts)
            n = wanted if wanted > 1 and self.server_takes_n else None
            try:
                answer = await self._request(client, row, prompt, n)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                if n is None:
                    raise self._teacher_error(e) from None
                self.server_takes_n = False
                continue
            except openai.APIError as e:
                raise self._teacher_error(e) from None
            except AnswerTooLarge as e:
                raise TeacherError(f"{self.url} {e} for one answer; {self.max_answer_bytes} bytes are the most that "
                                   f"--max_new_tokens {self.max_new_tokens} with --samples {self.samples} allows: is "
                                   "the server ignoring max_tokens? (raise --max_new_tokens if its answers really are "
                                   "this long)") from None
            texts += self._texts(answer)[:wanted]
        return texts

    async def _request(self, client: openai.AsyncOpenAI, row: int, prompt: str, n: int | None) -> dict:
        """The server's JSON answer to one request, after the client's retries; what it cost (the answer's `usage`,
        the client's retries) goes to `requests`."""
        params = {"model": self.model, "max_tokens": self.max_new_tokens, "temperature": self.temperature}
        if self.stops:
            params["stop"] = self.stops
        if self.top_p != 1.0:
            params["top_p"] = self.top_p
        if n is not None:
            params["n"] = n
        if not self.api_key:
            params["extra_headers"] = {"Authorization": openai.omit}
        began = time.perf_counter()
        if self.chat:
            messages = [{"role": "user", "content": prompt}]
            raw = await client.chat.completions.with_raw_response.create(messages=messages, **params)
        else:
            raw = await client.completions.with_raw_response.create(prompt=prompt, **params)
        seconds = time.perf_counter() - began
        content = raw.http_response.content
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TeacherError(f"{self.url} answered with bytes that are not UTF-8 (byte {e.start}: "
                               f"{content[e.start : e.start + 8]!r}...); the answer is refused, not stored with "
                               "replacement characters: check the server (and any proxy before it)") from None
        try:
            answer = json.loads(text)
        except json.JSONDecodeError:
            raise TeacherError(f"{self.url} answered with something other than JSON: {text[:200]!r}") from None
        usage = answer.get("usage") if isinstance(answer, dict) else None
        usage = usage if isinstance(usage, dict) else {}
        self.requests.append(request_record([row], token_count(usage.get("prompt_tokens")),
                                            token_count(usage.get("completion_tokens")), seconds,
                                            raw.retries_taken + 1))
        return answer

    def _teacher_error(self, error: openai.APIError) -> TeacherError:
        """What went wrong, in one line: a refusal (4xx) with the server's message, or the last failure retried."""
        if isinstance(error, openai.APIStatusError):
            reason = f"{error.status_code} {error.response.reason_phrase}"
            if not retried_status(error.status_code):
                detail = error.body.get("message", error.body) if isinstance(error.body, dict) else error.body
                return TeacherError(f"{self.url} answered {reason}: {str(detail)[:200]}; check --model, --base_url "
                                    "and the API key")
            last = f"HTTP {reason}"
        elif isinstance(error, openai.APITimeoutError):
            last = f"no answer within --timeout {self.timeout:g} s"
        else:
            last = str(error.__cause__ or error) or type(error.__cause__).__name__
        # The client numbers each retry in this header of the request it sends.
        attempts = int(error.request.headers.get("x-stainless-retry-count", 0)) + 1
        return TeacherError(f"{self.url}: no answer after {attempts} attempts (last: {last}); is the server up? "
                            "raise --timeout or --max_retries")

    def _texts(self, answer) -> list[str]:
        """The continuations in an answer, cut at the stop sequences; an answer of another shape is refused."""
        field = "message.content" if self.chat else "text"
        try:
            choices = answer["choices"]
            texts = [choice["message"]["content"] if self.chat else choice["text"] for choice in choices]
            if not texts:
                raise IndexError
        except (KeyError, IndexError, TypeError):
            raise TeacherError(f"{self.url} answered without choices[0].{field}: {json.dumps(answer)[:200]}; is it "
                               "an OpenAI-compatible completions server?") from None
        for i, text in enumerate(texts):
            if text is not None and not isinstance(text, str):
                raise TeacherError(f"{self.url} answered choices[{i}].{field} = {json.dumps(text)[:100]}, which is not "
                                   "text; is it an OpenAI-compatible completions server?")
            # JSON's \uXXXX escapes can spell half of a surrogate pair, which no UTF-8 file can hold.
            lone = next((char for char in text or "" if "\ud800" <= char <= "\udfff"), None)
            if lone is not None:
                raise TeacherError(f"{self.url} answered choices[{i}].{field} with the lone surrogate escape "
                                   f"{json.dumps(lone)}, which is not text; the answer is refused: check the server")
        return [cut_at_stop(text or "", self.stops) for text in texts]


def token_count(value) -> int | None:
    """A token count from a server's usage field; None where it gave none, or something that is not a count."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def retried_status(status: int) -> bool:
    """The statuses the openai client retries: request timeout, conflict, rate limit and server errors."""
    return status in (408, 409, 429) or status >= 500
