"""Answer normalisation shared by the string-matching metrics.

`normalize_vqa` reproduces the official VQA evaluation toolkit (`vqaEval.py`, also what EvalAI and lmms-eval
run), so VQAv2 / TextVQA numbers stay comparable with published ones; its quirks are kept on purpose.
`normalize_exact` is the much simpler rule of GQA-style exact match: case and punctuation ignored.
"""

from __future__ import annotations

import re
import string

# The toolkit's contraction table, verbatim (including entries that can never fire because the text is
# lowercased before the lookup, such as "Im", and the odd "somebody'd" -> "somebodyd").
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Note: ":", "'" and "." are not in the toolkit's list; apostrophes must survive for the contraction table,
# and periods have their own rule below.
VQA_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# A comma between two digits ("1,000") anywhere in the text switches the toolkit to deleting punctuation
# instead of replacing it by a space, so that thousands separators vanish: "1,000" -> "1000".
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The toolkit writes this as r"(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a (mistyped) lookahead that always
# holds before a ".", so the effective rule is "remove every period not followed by a digit": "yes." ->
# "yes", "3.5" kept.
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")
# The toolkit (vqaEval.py, and the EvalAI processor of LLaVA's m4c_evaluator.py and lmms-eval) calls
# `periodStrip.sub("", text, re.UNICODE)`: re.UNICODE (32) lands in `count`, so at most 32 periods are
# removed per answer. Reproduced, so that 40 periods then "yes" scores 0 here as it does officially.
OFFICIAL_PERIOD_LIMIT = int(re.UNICODE)

_WHITESPACE = re.compile(r"\s+")
_EXACT_PUNCTUATION = str.maketrans("", "", string.punctuation)


def process_punctuation(text: str) -> str:
    """The toolkit's `processPunctuation`.

    Each listed mark is deleted when it touches a space somewhere in the text (or when the text holds a
    comma between digits), and replaced by a space otherwise, so that "black/white" -> "black white" but
    "black / white" -> "black  white". Both tests look at the original text, as in the toolkit.
    """
    out = text
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in VQA_PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_DECIMAL.sub("", out, count=OFFICIAL_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """The toolkit's `processDigitArticle`: lowercase, number words -> digits, drop articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa(text: str) -> str:
    """Official VQA answer normalisation: whitespace, punctuation, then digits / articles / contractions.

    The result has collapsed whitespace (the final split / join) and no trailing period.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def normalize_exact(text: str) -> str:
    """Normalisation for exact match: lowercase, all ASCII punctuation deleted, whitespace collapsed."""
    text = text.lower().translate(_EXACT_PUNCTUATION)
    return _WHITESPACE.sub(" ", text).strip()
