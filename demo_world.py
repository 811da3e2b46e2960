"""The demo's invented world, generated from a seed: people, their facts, and every text the demo
trains and tests on (demo.py writes them to files).

    people, docs, chats, mc_docs, tests, dev, prompts = make_world(seed=0, n_people=64)

Each person has a home town, a job, a pet, a favourite colour, food and sport (the six facts a
4-choice question can ask), an age and a friend. The six are dealt out, per person, into three
kinds that the demo measures apart (issue 16: does the answer format transfer?):
    mc     asked as 4-choice questions in training (and stated in prose): memorisation, a check
    chat   stated only in chat answers (SFT), never in prose, never asked as 4-choice questions
    prose  stated only in the pretraining prose, never asked in training at all
The pretraining text states each prose-visible fact many times in varied forms and short stories
(varied rephrasings are what lets a model later answer questions about facts it only read:
Allen-Zhu & Li, "Physics of Language Models 3.1", arXiv:2309.14316). A 4-choice question shows the
group of four values that holds the true one, in a fixed order (see ATTRS); each kind's test keeps
its answer letters balanced, so chance is 25%.
"""
import itertools
import random

import mmlu

KINDS = ("mc", "chat", "prose")

FIRST = {"she": ("Anna Maria Clara Ella Rosa Nora Lucy Ida Mona Vera Hanna Iris Greta Olga Tessa "
                 "Wendy Lena Sofia Petra Zoe").split(),
         "he": ("Tom Felix Oscar Hugo Leo Max Paul Ivan Otto Carl Emil Jonas Bruno Dean Victor Sam "
                "Ben Omar Milo Karl").split()}
LAST = ("Stone Brook Miller Fisher Hill Wood Lake Frost Baker Reed Marsh Fox Field Rivers Moss "
        "Bell Hart Snow Gray Wells Cole Ford Lane Dale").split()
TOWNS = ("Millford Ashby Redwater Oakvale Pinecrest Stonebridge Greenhill Westport Lindon "
         "Brightmoor Elmstead Cobbleton").split()
# attribute -> its values, in groups of four: a 4-choice question shows the group that holds the
# true value, always in this order, so each value keeps its letter: the easiest form of the letter
# task (the letter is a function of the recalled value).
ATTRS = {
    "town": TOWNS,
    "job": ("baker farmer teacher doctor painter sailor miner tailor singer builder nurse "
            "judge").split(),
    "pet": ["cat", "dog", "parrot", "rabbit", "goat", "horse", "turtle", "owl"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"],
    "food": ["soup", "bread", "apples", "cheese", "rice", "fish", "cake", "plums"],
    "sport": ["tennis", "chess", "rowing", "running", "football", "archery", "skiing", "boxing"],
}
# Statements: many forms per fact. {n} = full name, {v} = value, {pp} = possessive pronoun.
SAY = {
    "town": ["{n} lives in {v}.", "{n} comes from {v}.", "The home town of {n} is {v}.",
             "{n} grew up in {v}.", "{n} has a house in {v}.", "{v} is where {n} lives.",
             "{n} is from the town of {v}."],
    "job": ["{n} works as a {v}.", "{n} is a {v}.", "The job of {n} is {v}.",
            "By trade, {n} is a {v}.", "{n} earns a living as a {v}.",
            "Everyone knows {n} as the {v}.", "{n} has worked as a {v} for years."],
    "pet": ["{n} has a pet {v}.", "{n} keeps a {v} at home.", "The pet of {n} is a {v}.",
            "{n} takes care of a {v}.", "At home, {n} looks after a {v}.",
            "{n} owns a {v} as a pet."],
    "color": ["The favourite colour of {n} is {v}.", "{n} likes the colour {v} best.",
              "{n} loves the colour {v}.", "{n} often wears {v}, {pp} favourite colour.",
              "Of all colours, {n} likes {v} most."],
    "food": ["The favourite food of {n} is {v}.", "{n} likes to eat {v} most of all.",
             "{n} loves {v}.", "For dinner, {n} would always choose {v}.",
             "Of all foods, {n} likes {v} best."],
    "sport": ["{n} plays {v}.", "The favourite sport of {n} is {v}.",
              "In {pp} free time, {n} does {v}.", "{n} is very good at {v}.",
              "{n} spends every weekend on {v}."],
    "age": ["{n} is {v} years old.", "The age of {n} is {v}.", "{n} turned {v} this year."],
    "friend": ["{n} is a good friend of {v}.", "The best friend of {n} is {v}.",
               "{n} and {v} are friends."],
}
ASK = {  # one question form per attribute, shared by the chats and the tests
    "town": "Where does {n} live?", "job": "What is the job of {n}?",
    "pet": "What pet does {n} have?", "color": "What is the favourite colour of {n}?",
    "food": "What is the favourite food of {n}?", "sport": "What sport does {n} play?",
}
ANSWER = {"town": "{n} lives in {v}.", "job": "{n} works as a {v}.", "pet": "{n} has a pet {v}.",
          "color": "The favourite colour of {n} is {v}.",
          "food": "The favourite food of {n} is {v}.", "sport": "{n} plays {v}."}
NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
           "fifteen sixteen seventeen eighteen").split()
WEATHER = ["It was a sunny morning", "It was raining", "The wind was cold", "It was a warm evening",
           "Snow was falling", "The sky was grey"]


def make_people(rng, n):
    """n people with distinct full names and random facts; each has a friend among the others."""
    names = [(g, f, last) for g in FIRST for f in FIRST[g] for last in LAST]
    rng.shuffle(names)
    people = []
    for g, first, last in names[:n]:
        p = {"name": f"{first} {last}", "first": first, "p": g,
             "pp": "her" if g == "she" else "his", "age": rng.randint(18, 80)}
        people.append(p)
    for a, vals in ATTRS.items():
        # each answer letter (position in the value's group of four) equally often, so that the
        # tests can be balanced: a random group, then the letter from a shuffled even deck
        deck = [i % 4 for i in range(n)]
        rng.shuffle(deck)
        for p, letter in zip(people, deck):
            p[a] = vals[4 * rng.randrange(len(vals) // 4) + letter]
    for i, p in enumerate(people):
        p["friend"] = people[(i + rng.randint(1, n - 1)) % n]["name"]
    return people


def mc_question(p, attr):
    """(question, 4 choices, answer letter): the group of four values that holds the true one, in
    fixed order. (Random distractors in a random order, so that no question's letter can be
    learned by heart, measured worse: the demo model never learned the letter at all.)"""
    i = ATTRS[attr].index(p[attr])
    return ASK[attr].format(n=p["name"]), ATTRS[attr][i - i % 4:i - i % 4 + 4], mmlu.LETTERS[i % 4]


def kind_counts(mc_facts):
    """{kind: facts of that kind per person}: mc_facts of the six, the rest split between chat and
    prose."""
    if not 0 < mc_facts < len(ATTRS) - 1:
        raise ValueError(f"--mc_facts {mc_facts} must be 1 to {len(ATTRS) - 2}: each person keeps "
                         "at least one chat and one prose fact")
    chat = (len(ATTRS) - mc_facts) // 2
    return {"mc": mc_facts, "chat": chat, "prose": len(ATTRS) - mc_facts - chat}


def deal_kinds(rng, people, counts):
    """{kind: [(person, attribute)]}: per person, counts[kind] of the six facts of each kind, dealt
    so that each kind's answer letters stay as balanced as they can (its test's chance stays
    25%)."""
    facts = {k: [] for k in KINDS}
    used = {k: dict.fromkeys(mmlu.LETTERS, 0) for k in KINDS}
    deals = sorted(set(itertools.permutations([k for k in KINDS for _ in range(counts[k])])))
    for p in people:
        attrs = rng.sample(list(ATTRS), len(ATTRS))
        order = rng.sample(deals, len(deals))  # ties go to a random deal

        def cost(deal):  # the spread of each kind's letter counts after this deal
            after = {k: dict(used[k]) for k in KINDS}
            for k, a in zip(deal, attrs):
                after[k][mc_question(p, a)[2]] += 1
            return sum(n * n for k in KINDS for n in after[k].values())
        best = min(order, key=cost)
        for kind, a in zip(best, attrs):
            used[kind][mc_question(p, a)[2]] += 1
            facts[kind].append((p, a))
        p["kinds"] = dict(zip(attrs, best))
    return facts


def shown(p, attr):
    """Whether the prose may state this fact (chat facts are only ever in chat answers)."""
    return p["kinds"].get(attr) != "chat"


def say(rng, p, attr):
    s = rng.choice(SAY[attr]).format(n=p["name"], v=p[attr], pp=p["pp"])
    return s[0].upper() + s[1:]


def bio(rng, p):
    """The prose facts about one person, each in a random form, in a random order."""
    attrs = [a for a in list(ATTRS) + ["age", "friend"] if shown(p, a)]
    rng.shuffle(attrs)
    return " ".join(say(rng, p, a) for a in attrs)


def story(rng, people):
    """A short story about two people that restates some of their prose facts."""
    a, b = rng.sample(people, 2)
    lines = [  # (the facts a line states, the line)
        ([(a, "town")], f"{rng.choice(WEATHER)} in {a['town']}."),
        ([(a, "job"), (a, "pet")], f"{a['name']}, the {a['job']}, went out with {a['pp']} "
                                   f"{a['pet']}."),
        ([(b, "job"), (b, "town")], f"On the road {a['p']} met {b['name']}, a {b['job']} from "
                                    f"{b['town']}."),
        ([(b, "town"), (b, "pet")], f"{b['name']} said: \"I am going home to {b['town']} to feed "
                                    f"my {b['pet']}.\""),
        ([(a, "town"), (a, "food")], f"{a['name']} laughed and said: \"Then I will go home to "
                                     f"{a['town']} and eat some {a['food']}.\""),
        ([(a, "sport"), (b, "sport")], f"Later {a['name']} played {a['sport']} and {b['name']} "
                                       f"played {b['sport']}."),
        ([(a, "color")], f"{a['name']} wore {a['color']} that day, because {a['color']} is "
                         f"{a['pp']} favourite colour.")]
    ok = [line for facts, line in lines if all(shown(p, attr) for p, attr in facts)]
    return " ".join(ok[:1] + rng.sample(ok[1:], min(len(ok) - 1, rng.randint(2, 4))))


def town_doc(rng, town, people):
    here = [p for p in people if p["town"] == town and shown(p, "town") and shown(p, "job")]
    rng.shuffle(here)
    if not here:
        return f"{town} is a quiet town. Nobody we know lives in {town}."
    forms = ["{n}, the {j}, lives in {t}.", "The {j} {n} has a house in {t}.",
             "{n} works as a {j} in {t}.", "In {t} lives {n}, who is a {j}."]
    parts = [rng.choice([f"{town} is a small town.", f"Welcome to {town}.",
                         f"This is the town of {town}."])]
    return " ".join(parts + [rng.choice(forms).format(n=p["name"], j=p["job"], t=town)
                             for p in here])


def arithmetic(rng):
    """A few sums and differences in words and in digits (kept under twenty so words exist for
    them)."""
    out = []
    for _ in range(rng.randint(3, 6)):
        x, y = rng.randint(0, 9), rng.randint(0, 9)
        if rng.random() < 0.5:
            out.append(rng.choice([f"{NUMBERS[x]} plus {NUMBERS[y]} is {NUMBERS[x + y]}.",
                                   f"{x} + {y} = {x + y}."]))
        else:
            x, y = max(x, y), min(x, y)
            out.append(rng.choice([f"{NUMBERS[x]} minus {NUMBERS[y]} is {NUMBERS[x - y]}.",
                                   f"{x} - {y} = {x - y}."]))
    return " ".join(out)


def mc_item(question, choices, answer):
    return {"question": question, "choices": choices, "answer": answer}


def mc_text(rows):
    """4-choice questions as one document in the plain-text layout eval_mmlu.py scores (lm-eval's
    `mmlu`, mmlu.build_prompt), each followed by its answer letter."""
    items = [mc_item(*r) for r in rows]
    return mmlu.build_prompt("demo_world", items[-1], items[:-1]) + " " + items[-1]["answer"]


def mc_prompt(question, choices):
    """A question as the user turn of `eval_mmlu.py --chat` (the reply is the bare letter)."""
    return mmlu.chat_messages(mc_item(question, choices, None), [])[0]["content"]


def quiz(facts):
    """Questions with their answers in lm-eval's cloze layout (eval_mmlu.py --method cloze): the
    question-answer form, shown on mc facts only (they are the ones asked in training)."""
    return "The following are questions (with answers) about demo world.\n\n" + "\n\n".join(
        f"Question: {ASK[a].format(n=p['name'])}\nAnswer: {p[a]}" for p, a in facts)


def pretrain_docs(rng, people, mc_facts, n_docs):
    docs = []
    for _ in range(n_docs):
        r = rng.random()
        if r < 0.55:
            docs.append(bio(rng, rng.choice(people)))
        elif r < 0.75:
            docs.append(story(rng, people))
        elif r < 0.82:
            docs.append(town_doc(rng, rng.choice(TOWNS), people))
        elif r < 0.9:
            docs.append(arithmetic(rng))
        else:  # questions and answers (neither chat nor prose facts are ever asked)
            docs.append(quiz(rng.sample(mc_facts, min(3, len(mc_facts)))))
    return docs


def chat_turns(rng, facts, mc_copies, chat_copies):
    """(user, assistant) turns: each chat fact as an open question, chat_copies times, answered in
    varied forms; each mc fact as a 4-choice question (mc_copies times) and once as an open one;
    some sums."""
    turns = [(ASK[a].format(n=p["name"]), say(rng, p, a))
             for p, a in facts["chat"] * chat_copies]
    turns += [(ASK[a].format(n=p["name"]), ANSWER[a].format(n=p["name"], v=p[a]))
              for p, a in facts["mc"]]
    for p, a in facts["mc"] * mc_copies:
        q, choices, ans = mc_question(p, a)
        turns.append((mc_prompt(q, choices), ans))
    for _ in range(len(facts["chat"]) // 4):
        x, y = rng.randint(0, 9), rng.randint(0, 9)
        turns.append((f"What is {NUMBERS[x]} plus {NUMBERS[y]}?",
                      f"{NUMBERS[x]} plus {NUMBERS[y]} is {NUMBERS[x + y]}."))
    rng.shuffle(turns)
    return turns


def conversations(rng, turns):
    """Turns grouped into conversations of one to three."""
    chats = []
    i = 0
    while i < len(turns):
        k = rng.choice([1, 1, 2, 3])
        chats.append([m for u, a in turns[i:i + k]
                      for m in ({"role": "user", "content": u},
                                {"role": "assistant", "content": a})])
        i += k
    return chats


def make_world(seed=0, n_people=64, n_docs=8000, mc_facts=2, mc_copies=2, chat_copies=3):
    """Everything the demo needs, as Python objects: (people, docs, chats, mc_docs, tests, dev,
    prompts). tests: {kind: [(question, choices, letter)]}; mc_docs: the mc facts' 4-choice
    questions in the plain-text layout (a mid stage's data), each fact mc_copies times."""
    rng = random.Random(seed)
    people = make_people(rng, n_people)
    facts = deal_kinds(rng, people, kind_counts(mc_facts))
    docs = pretrain_docs(rng, people, facts["mc"], n_docs)
    chats = conversations(rng, chat_turns(rng, facts, mc_copies, chat_copies))
    rows = [mc_question(p, a) for p, a in facts["mc"] * mc_copies]
    rng.shuffle(rows)
    mc_docs = [mc_text(rows[i:i + 4]) for i in range(0, len(rows), 4)]
    tests = {k: [mc_question(p, a) for p, a in facts[k]] for k in KINDS}
    dev = [mc_question(p, a) for p, a in rng.sample(facts["mc"], min(5, len(facts["mc"])))]
    # Open questions about chat and prose facts for the report's samples.
    shown_facts = facts["chat"][:2] + facts["prose"][:2]
    prompts = [{"question": ASK[a].format(n=p["name"]),
                "expected": ANSWER[a].format(n=p["name"], v=p[a]), "kind": p["kinds"][a]}
               for p, a in shown_facts]
    prompts.append({"question": "What is three plus four?",
                    "expected": "three plus four is seven.", "kind": "sum"})
    return people, docs, chats, mc_docs, tests, dev, prompts
