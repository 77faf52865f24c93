"""Deterministic synthetic children's stories in the spirit of TinyStories.

TinyStories (Eldan & Li, 2023) showed that models of a few million parameters
learn fluent, coherent English from short stories written with the vocabulary of
a three- or four-year-old. No downloads are possible on our machines, so this
module writes such stories itself: the library's embedded default dataset.

How a story is made:

* a cast (a child or a small animal as the hero, a friend, a grown-up, a pet), a
  place, a season, weather and time of day are drawn once per story and kept
  in a context dict, so every sentence refers to the same people and things;
* one of ~24 plot functions (lost toy, sharing, a fear overcome, a race, a seed
  that grows, a surprise party, ...) narrates beginning, problem, attempts and
  resolution, with optional extra episodes and a lesson;
* every step picks one of several sentence templates. A template holds inline
  choices, `[a|b|c]` (nestable, `[x|]` makes x optional), and slots from the
  context, `{hero}`, `{his}` (the hero's possessive), `{friend.he}`, ...;
* a final pass fixes a/an, capitals and spacing.

`story(seed, index)` seeds its own `random.Random` from (seed, index) through a
hash, so any story is reproducible on its own, on any machine and in any order.
Bump `VERSION` whenever the output changes: caches are keyed on it.
"""
from __future__ import annotations

import hashlib
import itertools
import random
import re
from typing import Iterator

VERSION = 1

__all__ = ["VERSION", "generate_story", "story", "stories"]

# ----------------------------------------------------------------------------- word lists
# Simple, common names; a few hundred of them keep a model from memorising a cast.

BOY_NAMES = (
  "Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Tim", "Joe", "Dan", "Ned", "Ted", "Finn",
  "Liam", "Noah", "Owen", "Luke", "Jake", "Adam", "Alex", "Andy", "Billy", "Bobby",
  "Charlie", "Danny", "David", "Eli", "Eddie", "Felix", "Frank", "Fred", "George",
  "Harry", "Henry", "Hugo", "Ian", "Isaac", "Jamie", "Jasper", "Jay", "Jim", "Joey",
  "John", "Kai", "Kevin", "Kit", "Lenny", "Louis", "Marco", "Mark", "Matt", "Mike",
  "Milo", "Nate", "Nick", "Oliver", "Oscar", "Otis", "Paul", "Pete", "Ray", "Rob",
  "Ryan", "Sammy", "Simon", "Theo", "Toby", "Tony", "Zack", "Arlo", "Caleb", "Dylan",
  "Ethan", "Evan", "Gabe", "Hank", "Jonah", "Jude", "Kyle", "Lucas", "Mason", "Miles",
  "Niko", "Omar", "Ravi", "Reed", "Rudy", "Seth", "Troy", "Victor", "Wes", "Will",
  "Yusuf", "Zane", "Aaron", "Amir", "Arthur", "Bruno", "Carl", "Cody", "Colin", "Dev",
  "Dexter", "Elliot", "Emil", "Enzo", "Ezra", "Gus", "Hari", "Ivan", "Jacob", "Jon",
  "Kofi", "Lars", "Levi", "Mateo", "Neil", "Ollie", "Pablo", "Rafi", "Rory", "Roy",
  "Sid", "Stan", "Teddy", "Walter", "Wyatt", "Ali", "Benny", "Chris", "Dean", "Eric",
  "Flynn", "Glen", "Hal", "Ike", "Jesse", "Karl", "Lewis", "Mick", "Nolan", "Phil",
  "Quinn", "Ron", "Scott", "Tyler", "Vince", "Wally", "Xavi", "Yan", "Abe", "Bart",
  "Cole", "Drew", "Ed", "Gary", "Ibrahim", "Joel", "Kenji", "Luca", "Marcus", "Nat",
  "Pedro", "Rami", "Sean", "Tariq", "Umar", "Vic", "Zeke", "Archie", "Bill", "Dom",
)

GIRL_NAMES = (
  "Lily", "Mia", "Sue", "Anna", "Lucy", "Emma", "Ella", "Amy", "Sara", "Zoe", "Kate",
  "Jane", "Ruby", "Rosie", "Daisy", "Molly", "Polly", "Holly", "Hannah", "Grace", "Ava",
  "Ivy", "Chloe", "Nina", "Nora", "Olivia", "Sophie", "Tess", "Tina", "Alice", "Amelia",
  "Bella", "Beth", "Cara", "Clara", "Dora", "Ellie", "Eva", "Fay", "Fiona", "Gemma",
  "Hazel", "Isla", "Jenny", "Jess", "Julia", "June", "Kim", "Lara", "Leah", "Lena",
  "Lola", "Luna", "Maya", "Meg", "Millie", "Nell", "Olive", "Pam", "Pia", "Poppy",
  "Rose", "Ruth", "Sally", "Sasha", "Stella", "Susie", "Vera", "Wendy", "Willa", "Zara",
  "Abby", "Ada", "Aisha", "Alma", "Anya", "April", "Aria", "Bea", "Cleo", "Dina",
  "Edie", "Elsa", "Emily", "Erin", "Esme", "Faith", "Freya", "Gina", "Greta", "Hope",
  "Ida", "Iris", "Jade", "Joy", "Kara", "Kiki", "Layla", "Leila", "Lila", "Lottie",
  "Mabel", "Maddie", "Mae", "Maria", "Mila", "Nadia", "Naomi", "Nia", "Opal", "Penny",
  "Priya", "Rita", "Rosa", "Sadie", "Sofia", "Tara", "Tilly", "Violet", "Winnie",
  "Yara", "Amara", "Bonnie", "Carmen", "Cora", "Della", "Elena", "Fern", "Gia", "Hana",
  "Ines", "Jana", "Kira", "Lina", "Lulu", "Mina", "Nola", "Pearl", "Rae", "Talia",
  "Vicky", "Becky", "Carla", "Dotty", "Eve", "Flora", "Gwen", "Heidi", "Imani", "Jill",
  "Katie", "Lucia", "Martha", "Nancy", "Pippa", "Rina", "Sienna", "Tamsin", "Uma",
  "Valerie", "Wren", "Xena", "Yasmin", "Zuri", "Annie", "Cassie", "Dana", "Emi", "Frida",
)

# Names for animal heroes and pets ("a little fox named Pip", "a dog named Biscuit").
CRITTER_NAMES = (
  "Pip", "Bo", "Dot", "Fluff", "Coco", "Nibbles", "Patch", "Bun", "Tuck", "Sunny",
  "Pepper", "Button", "Maple", "Acorn", "Twig", "Pebble", "Mossy", "Clover", "Bramble",
  "Whiskers", "Sniff", "Tippy", "Wiggles", "Bubbles", "Puddle", "Nutmeg", "Ginger",
  "Biscuit", "Cocoa", "Fuzzy", "Squeak", "Rolo", "Bingo", "Pickles", "Toffee", "Peanut",
  "Jingle", "Dusty", "Sparky", "Ziggy", "Pumpkin", "Noodle", "Honey", "Scout", "Misty",
  "Tumble", "Bean", "Rusty", "Sooty", "Snowy", "Blossom", "Buddy", "Lucky", "Shadow",
  "Socks", "Rex", "Fudge", "Mittens", "Oreo", "Waffles", "Bubba", "Chip", "Dash",
  "Flash", "Gizmo", "Jelly", "Kiwi", "Mango", "Muffin", "Olly", "Pogo", "Sprout", "Taffy",
)

# (kind, home, where it lives, how it moves). Only animals that can plausibly
# run about, play and talk with friends in a meadow or a wood.
ANIMAL_KINDS = (
  ("fox", "den", "in a big green forest", "ran"),
  ("bunny", "burrow", "in a sunny meadow", "hopped"),
  ("bear", "cave", "in a deep forest", "ran"),
  ("mouse", "nest", "in a field of tall grass", "ran"),
  ("squirrel", "tree", "in a tall oak tree", "ran"),
  ("duck", "nest", "by a little pond", "waddled"),
  ("hedgehog", "nest", "under a hedge in a garden", "ran"),
  ("lamb", "barn", "on a small farm", "ran"),
  ("piglet", "barn", "on a busy farm", "ran"),
  ("chick", "coop", "on a quiet farm", "ran"),
  ("frog", "pond", "by a quiet pond", "hopped"),
  ("raccoon", "tree", "at the edge of the woods", "ran"),
  ("beaver", "lodge", "by a wide river", "ran"),
  ("kitten", "basket", "in a little house", "ran"),
  ("puppy", "doghouse", "in a little house with a garden", "ran"),
  ("deer", "glade", "in a quiet forest", "ran"),
)
# Outdoor places an animal hero can go.
ANIMAL_PLACES = ("forest", "meadow", "pond", "farm", "garden", "river", "hill")

# Pets a child can have and lose: (kind, sound it makes).
PETS = (
  ("dog", "barked"), ("puppy", "yipped"), ("cat", "meowed"), ("kitten", "mewed"),
  ("bunny", "sniffed"), ("hamster", "squeaked"), ("guinea pig", "squeaked"),
  ("puppy", "barked"),
)

# (relation in narration, what the child calls them, pronoun)
FAMILY = (
  ("mom", "Mom", "she"), ("dad", "Dad", "he"), ("grandma", "Grandma", "she"),
  ("grandpa", "Grandpa", "he"), ("mom", "Mommy", "she"), ("dad", "Daddy", "he"),
  ("nana", "Nana", "she"), ("papa", "Papa", "he"), ("aunt", "Aunt", "she"),
  ("uncle", "Uncle", "he"),
)

SURNAMES = (
  "Brown", "Green", "Lee", "Hill", "Wood", "Gray", "Bell", "Lane", "Moon", "Stone",
  "Banks", "Reed", "King", "Bird", "Park", "Snow", "Rivers", "Baker", "Cook", "Field",
  "Miller", "Page", "West", "Young", "Hart", "Rose", "Long", "Frost", "Cole", "May",
)

# Strangers who turn up to help: (phrase, pronoun).
STRANGERS = (
  ("a kind old man", "he"), ("an old lady with a cane", "she"), ("a tall man in a blue hat", "he"),
  ("a girl with red boots", "she"), ("a boy on a bike", "he"), ("a lady with a dog", "she"),
  ("a friendly police officer", "she"), ("a park ranger", "he"), ("a farmer", "he"),
  ("a woman with a stroller", "she"), ("a mail carrier", "he"), ("an old fisherman", "he"),
)

# Toys: (noun, how you play with it). Singular, so "it" always fits.
TOYS = (
  ("ball", "bounced it up and down"), ("teddy bear", "gave it a big hug"),
  ("toy car", "made it go zoom"), ("doll", "brushed its hair"),
  ("toy train", "made it go choo choo"), ("yo-yo", "made it go up and down"),
  ("robot", "made it walk and beep"), ("stuffed bunny", "hugged it tight"),
  ("toy boat", "pretended it was sailing on the sea"), ("spinning top", "watched it spin"),
  ("toy dinosaur", "made it stomp and roar"), ("puppet", "made it talk in a funny voice"),
  ("rubber duck", "made it squeak"), ("toy plane", "made it fly through the air"),
  ("music box", "listened to its little song"), ("magic wand", "waved it and made a wish"),
  ("toy horse", "made it gallop"), ("fire truck", "made its bell ring"),
  ("toy dragon", "made it fly and roar"), ("stuffed elephant", "hugged it close"),
  ("toy rocket", "counted down and made it blast off"), ("kaleidoscope", "looked at the pretty shapes"),
  ("toy drum", "played a loud song on it"), ("toy tractor", "pushed it through the dirt"),
  ("stuffed lion", "made it roar"), ("wooden sword", "pretended to be a knight"),
  ("toy piano", "played a little tune"), ("bouncy ball", "bounced it as high as it could go"),
  ("toy bus", "drove it all around"), ("stuffed owl", "made it say hoot hoot"),
)
TOY_ADJECTIVES = ("little", "big", "small", "tiny")  # not "new"/"old": stories say "a new toy"
COLORS = (
  "red", "blue", "green", "yellow", "pink", "purple", "orange", "white", "brown",
  "gold", "silver", "gray", "black",
)

FOODS = (
  "apple", "banana", "cookie", "cupcake", "muffin", "sandwich", "orange", "pear", "peach",
  "plum", "carrot", "pancake", "cracker", "pretzel", "strawberry", "bun", "donut", "bagel",
  "waffle", "lollipop", "cheese sandwich", "jam sandwich", "slice of cake", "slice of pizza",
  "piece of bread", "bowl of soup", "cup of milk", "ice cream cone", "honey cake", "grape",
  "cherry", "biscuit", "egg", "rice cake", "taco", "slice of melon", "fig", "boiled egg",
)
ANIMAL_FOODS = (
  "acorn", "berry", "nut", "carrot", "apple", "pear", "mushroom", "cherry", "plum",
  "seed cake", "honey cake", "strawberry", "clover leaf", "sunflower seed", "pine cone",
)

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
SEASON_WEATHER = {
  "spring": ("sunny", "warm", "bright", "breezy"),
  "summer": ("hot", "sunny", "bright", "warm"),
  "fall": ("windy", "cool", "cloudy", "sunny"),
  "winter": ("cold", "snowy", "frosty", "chilly"),
}
SUNNY = ("sunny", "warm", "bright", "hot")
TIMES = ("morning", "afternoon", "morning", "day")

TRAITS = (
  "kind", "happy", "curious", "cheerful", "friendly", "gentle", "playful", "clever",
  "busy", "funny", "sweet", "smart", "helpful", "lively", "good", "polite",
)
HOBBIES = (
  "draw pictures", "sing songs", "read books", "play outside", "build with blocks", "dance",
  "ride {his} bike", "play with {his} ball", "splash in puddles", "climb trees",
  "pick flowers", "play dress-up", "look at the stars", "play hide and seek",
  "make funny faces", "help in the garden", "bake with {his} grandma", "run very fast",
  "count the clouds", "paint with bright colors", "play games with {his} friends",
  "watch the birds", "jump rope", "collect shells", "collect pretty rocks", "tell jokes",
  "learn new words", "play on the swings", "make sand pies", "feed the ducks",
  "listen to stories", "play pretend", "sing in the bath", "skip down the street",
)
ANIMAL_HOBBIES = (
  "hop in the tall grass", "climb trees", "sing songs", "look for berries",
  "splash in the pond", "roll down the hill", "play chase", "smell the flowers",
  "watch the clouds", "collect acorns", "play hide and seek", "dig in the dirt",
  "nap in the sun", "chase butterflies", "listen to the birds", "count the stars",
)
HOMETOWNS = (
  "in a small town", "in a little village", "in a house by the sea",
  "in a busy city", "in a yellow house at the end of the street",
  "in a little house near the park", "on a farm", "in a cozy cottage",
  "in a tall apartment building", "in a blue house with a big garden",
)

# Places: preposition, spots to search, and sights for extra description.
PLACES = {
  "park": ("at", (
    "under the bench", "behind a big tree", "near the slide", "in the sandbox",
    "by the swings", "under a bush", "next to the fountain", "by the gate",
  ), (
    "children playing on the swings", "a man walking his dog", "ducks on the pond",
    "a boy flying a kite", "pigeons pecking at crumbs", "a lady reading a book",
    "two squirrels chasing each other",
  )),
  "forest": ("in", (
    "under a pile of leaves", "behind a log", "near a big rock", "by the old oak tree",
    "under a bush", "inside a hollow log", "next to a little stream", "under a fern",
  ), (
    "tall trees with green leaves", "a squirrel with an acorn", "a woodpecker on a tree",
    "little mushrooms on a log", "a deer drinking from a stream", "a rabbit hopping by",
  )),
  "beach": ("at", (
    "under the sand", "behind a rock", "near the water", "by the big umbrella",
    "in a tide pool", "next to the towels", "by the sandcastle", "under a pile of seaweed",
  ), (
    "big blue waves", "seagulls flying high", "pretty shells on the sand",
    "a little crab running sideways", "boats far out on the water", "a family building a sandcastle",
  )),
  "farm": ("on", (
    "in the barn", "behind the haystack", "near the pig pen", "under the old cart",
    "by the fence", "in the hen house", "next to the water trough", "by the apple tree",
  ), (
    "cows eating grass", "hens pecking at seeds", "a big red barn", "sheep with soft wool",
    "a horse in the field", "piglets rolling in the mud",
  )),
  "garden": ("in", (
    "under the roses", "behind the shed", "in a flower pot", "by the fence",
    "under a big leaf", "near the bird bath", "in the vegetable patch", "behind the watering can",
  ), (
    "bright flowers", "bees buzzing from flower to flower", "a butterfly on a rose",
    "a snail on a leaf", "tomatoes growing on a vine", "a robin looking for worms",
  )),
  "playground": ("at", (
    "under the slide", "by the swings", "in the sand", "behind the climbing frame",
    "near the gate", "under the seesaw", "by the water fountain", "next to the bench",
  ), (
    "kids on the seesaw", "a girl going down the slide", "children playing tag",
    "a boy on the monkey bars", "a dad pushing a swing",
  )),
  "meadow": ("in", (
    "in the tall grass", "behind a rock", "near the stream", "under a bush",
    "by the old fence", "among the flowers", "next to a big tree", "by a molehill",
  ), (
    "flowers of every color", "butterflies dancing in the air", "bees buzzing",
    "a rabbit nibbling clover", "a bird singing in a bush",
  )),
  "pond": ("by", (
    "among the reeds", "under a rock", "near the water", "behind a tree",
    "under a lily pad", "by the little bridge", "in the mud", "next to the bench",
  ), (
    "ducks swimming in a row", "frogs on lily pads", "little fish in the water",
    "a dragonfly zooming by", "a heron standing on one leg",
  )),
  "river": ("by", (
    "behind a big rock", "among the reeds", "under the bridge", "near the water",
    "by a fallen log", "under a willow tree", "next to the path", "in the tall grass",
  ), (
    "water splashing over rocks", "a boat floating by", "ducks paddling",
    "a fish jumping out of the water", "a beaver carrying a stick",
  )),
  "hill": ("on", (
    "behind a rock", "in the tall grass", "under a bush", "by the old tree",
    "near the top", "next to the path", "under a pile of leaves", "by a fence post",
  ), (
    "the whole town far below", "clouds floating by", "sheep grazing on the slope",
    "a kite flying high", "a hawk circling in the sky",
  )),
  "school": ("at", (
    "under a desk", "in the cubby", "by the bookshelf", "in the coat room",
    "behind the teacher's desk", "in the lost and found box", "under the art table",
    "by the window",
  ), (
    "pictures on the walls", "children reading books", "a big map of the world",
    "a fish tank with orange fish", "a row of little coats",
  )),
  "zoo": ("at", (
    "by the monkey house", "near the penguins", "under a bench", "by the gift shop",
    "next to the lion cage", "near the duck pond", "by the snack stand", "under a tree",
  ), (
    "a tall giraffe eating leaves", "monkeys swinging", "a lion taking a nap",
    "penguins waddling", "an elephant spraying water",
  )),
}
HOME_SPOTS = (
  "under the bed", "behind the sofa", "under the table", "in the closet",
  "in the laundry basket", "under a pillow", "behind the door", "in the bathtub",  # not "toy box": see _lost_toy
  "under the stairs", "in the kitchen", "on the bookshelf", "in the garden", "in {his} backpack",
)
# Things found while searching, when it is not the thing you want.
JUNK = (
  "an old sock", "a pile of leaves", "a sleepy cat", "a shiny button", "some crumbs",
  "a spider web", "a lost mitten", "a little snail", "a pinecone", "a dusty crayon",
  "a paper crown", "a round pebble", "a feather", "a bottle cap", "a lost marble",
)
PLAY_PLACES = ("park", "beach", "garden", "playground", "meadow", "forest", "pond", "hill")

# Lessons: each finishes "{hero} learned that ...".
LESSONS = {
  "sharing": (
    "sharing makes everyone happy", "it is more fun to play together",
    "sharing is a kind thing to do", "a toy is more fun when you share it",
    "when you share, you make a friend smile",
  ),
  "kindness": (
    "a little kindness can make a big difference", "being kind makes everyone feel good",
    "a friend in need is a friend indeed", "a kind word can turn a sad day into a happy one",
    "it feels good to help a friend",
  ),
  "bravery": (
    "being brave does not mean you are never scared", "things are often less scary than they seem",
    "you can be scared and brave at the same time", "it is okay to be scared sometimes",
    "it helps to take a deep breath when you are scared",
  ),
  "honesty": (
    "telling the truth is always the best thing to do", "it is better to tell the truth, even when it is hard",
    "everyone makes mistakes, and saying so makes things better", "the truth makes a heavy heart feel light",
  ),
  "patience": (
    "good things take time", "waiting is hard, but it is worth it",
    "being patient is a good thing", "some things cannot be rushed",
  ),
  "trying": (
    "if you keep trying, you can do it", "practice makes things easier",
    "it is okay to fall down, as long as you get up again", "you should never give up",
    "every mistake helps you learn",
  ),
  "sorry": (
    "saying sorry can fix a lot", "a good friend says sorry", "it is brave to say sorry",
    "words can hurt, but kind words can heal",
  ),
  "helping": (
    "helping others makes you feel good too", "it is good to help when someone needs it",
    "friends help each other", "many hands make light work",
  ),
  "careful": (
    "it is important to be careful", "it is good to listen to grown-ups",
    "being careful keeps you safe", "rules are there to keep us safe",
  ),
  "care": (
    "it is important to take care of your things", "you should keep your favorite things safe",
    "it is wise to be careful with the things you love", "a favorite toy needs a safe place",
  ),
  "teamwork": (
    "working together makes things easier", "two friends can do more than one",
    "teamwork makes hard jobs fun", "things go better when you help each other",
  ),
  "friendship": (
    "friends make every day better", "good friends care about each other",
    "everything is more fun with a friend", "a good friend is worth more than a prize",
  ),
  "new friends": (
    "it is nice to make a new friend", "a new friend can become a best friend",
    "saying hello is the first step to a new friendship", "everyone feels shy sometimes",
  ),
  "calm": (
    "it is important to stay calm when you are lost", "asking for help is a smart thing to do",
    "a calm mind finds the way", "it is good to stay close to your family",
  ),
  "making do": (
    "a change of plans can still be fun", "you can have fun even on a rainy day",
    "there is always something fun to do", "a smile can make a gray day bright",
  ),
  "giving": (
    "the best gifts come from the heart", "giving feels as good as getting",
    "a gift you make yourself is very special", "love is the best present",
  ),
}

# Extra description for outdoor scenes, by weather.
WEATHER_LINES = {
  "sunny": ("The sun was shining, and the birds were singing.", "The sky was blue and bright.",
            "The sun felt warm on {his} face."),
  "warm": ("The air was warm and sweet.", "It was warm, and a soft wind was blowing.",
           "The sun was warm and golden."),
  "bright": ("Everything looked bright and new.", "The sky was clear, without a single cloud.",
             "The grass sparkled in the sun."),
  "hot": ("It was so hot that {hero} wanted a cold drink.", "The sun was big and hot.",
          "Even the dogs were resting in the shade."),
  "breezy": ("A soft wind blew through the trees.", "The wind played with {his} hair.",
             "Little clouds raced across the sky."),
  "windy": ("The wind was blowing the leaves all around.", "The trees were swaying in the wind.",
            "The wind whooshed and whistled."),
  "cool": ("The air was cool and fresh.", "Red and yellow leaves crunched under {his} feet.",
           "{hero} was glad to have {his} warm coat on."),
  "cloudy": ("Big gray clouds filled the sky.", "The sky was gray, but it did not rain.",
             "The clouds looked like big puffs of wool."),
  "cold": ("It was cold, and {hero} could see {his} breath.", "{hero} wore {his} hat and mittens.",
           "The cold air made {his} nose red."),
  "snowy": ("Snow covered the ground like a white blanket.", "Soft snowflakes were falling.",
            "Everything was white and quiet."),
  "frosty": ("The grass was white with frost.", "Frost sparkled on the windows.",
             "Little icicles hung from the roofs."),
  "chilly": ("It was a bit chilly, so {hero} wore {his} scarf.", "A chilly wind blew.",
             "The sky was pale and the air was crisp."),
  "rainy": ("Rain was falling softly.", "Big drops of rain tapped on the window.",
            "Puddles were everywhere."),
}

# Generic closing lines, after the plot is resolved.
CLOSERS = (
  "That night, {hero} went to bed with a big smile on {his} face.",
  "It was a [wonderful|happy|great|lovely] day.",
  "{hero} felt [warm and happy|happy and proud|very happy] inside.",
  "{hero} would never forget that day.",
  "It was the best day ever.",
  "And that was a very good day for {hero}.",
  "When {hero} went to sleep that night, {he} dreamed about [the whole day|all the fun {he} had had].",
  "{hero} smiled. It had been a good day after all.",
)
# Closers for stories that happen away from home.
OUTDOOR_CLOSERS = CLOSERS + (
  "The sun went down, and {hero} was happy.",
  "[Everyone|They all] went home happy.",
  "Then it was time to go home, and {hero} skipped all the way.",
)

# ----------------------------------------------------------------------------- templates


class _Slot:
  __slots__ = ("key",)

  def __init__(self, key: str):
    self.key = key


_TOKEN = re.compile(r"\{([^{}]+)\}|[\[\]|]")
_COMPILED: dict[str, tuple] = {}


def _compile(text: str) -> tuple:
  """'a [b|c {x}]' -> ('a ', (('b',), ('c ', _Slot('x')))): str, choice tuple, or _Slot."""
  stack = [[[]]]  # open choices; each is a list of alternatives, each a list of parts
  pos = 0
  for m in _TOKEN.finditer(text):
    if m.start() > pos:
      stack[-1][-1].append(text[pos:m.start()])
    tok = m.group()
    if tok == "[":
      stack.append([[]])
    elif tok == "|":
      if len(stack) == 1:
        raise ValueError(f"'|' outside [...] in template {text!r}")
      stack[-1].append([])
    elif tok == "]":
      if len(stack) == 1:
        raise ValueError(f"unbalanced ']' in template {text!r}")
      group = stack.pop()
      stack[-1][-1].append(tuple(tuple(alt) for alt in group))
    else:
      stack[-1][-1].append(_Slot(m.group(1)))
    pos = m.end()
  if pos < len(text):
    stack[-1][-1].append(text[pos:])
  if len(stack) != 1:
    raise ValueError(f"unbalanced '[' in template {text!r}")
  return tuple(stack[0][0])


def _render(parts: tuple, ctx: dict, rng: random.Random, out: list) -> None:
  for p in parts:
    cls = p.__class__
    if cls is str:
      out.append(p)
    elif cls is tuple:
      _render(rng.choice(p), ctx, rng, out)
    else:
      out.append(ctx[p.key])


# Words after which "a" stays "a" although they start with a vowel, and the reverse.
_A_BEFORE_VOWEL = ("uni", "use", "one", "once", "eu", "ukulele")
_AN_BEFORE_H = ("hour", "honest", "honor")
_ARTICLE = re.compile(r"\b([Aa]) ([A-Za-z]+)")
_SENTENCE_START = re.compile(r"([.!?] )([a-z])")
_SPLIT = re.compile(r"(?<![MD]r)(?<!Mrs)(?<!Ms)([.!?]) ")


def _fix_article(m: re.Match) -> str:
  word = m.group(2)
  low = word.lower()
  vowel = low[0] in "aeiou" and not low.startswith(_A_BEFORE_VOWEL)
  if vowel or low.startswith(_AN_BEFORE_H):
    return f"{m.group(1)}n {word}"
  return m.group(0)


def _cap(s: str) -> str:
  return s[:1].upper() + s[1:]


class _Who:
  """A character: narration name, what others call them, kind ("girl", "fox") and pronouns."""
  __slots__ = ("name", "call", "kind", "he", "him", "his", "self")

  def __init__(self, name: str, pronoun: str, kind: str = "", call: str | None = None):
    self.name, self.kind = name, kind
    self.call = name if call is None else call
    self.he = pronoun
    self.him, self.his, self.self = (("him", "his", "himself") if pronoun == "he"
                                     else ("her", "her", "herself"))


# ----------------------------------------------------------------------------- the story builder


class _Tale:
  """Collects the sentences of one story; `c` is the context the templates read."""

  def __init__(self, rng: random.Random):
    self.rng = rng
    self.c: dict[str, str] = {}
    self.paras: list[list[str]] = [[]]
    self.animal = False
    self.who: dict[str, _Who] = {}
    self.last_speaker: _Who | None = None
    self.narrated: set[str] = set()  # so no sentence is told twice

  # --- small helpers
  def chance(self, p: float) -> bool:
    return self.rng.random() < p

  def pick(self, seq):
    return self.rng.choice(seq)

  def fill(self, template: str) -> str:
    parts = _COMPILED.get(template)
    if parts is None:
      parts = _COMPILED[template] = _compile(template)
    out: list[str] = []
    try:
      _render(parts, self.c, self.rng, out)
    except KeyError as e:
      raise KeyError(f"template {template!r} needs {e}") from None
    s = "".join(out)
    # Empty choices ("[very |]") may leave stray spaces.
    if "  " in s or s[:1] == " " or s[-1:] == " ":
      s = " ".join(s.split())
    if " ," in s or " ." in s or " !" in s or " ?" in s:
      s = s.replace(" ,", ",").replace(" .", ".").replace(" !", "!").replace(" ?", "?")
    if "!." in s or "?." in s:  # a slot ending in "!" inside "{x}."
      s = s.replace("!.", "!").replace("?.", "?")
    if ". " in s or "! " in s or "? " in s:  # capitals after a sentence inside the template
      s = _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), s)
    return s

  def set(self, key: str, *options: str) -> str:
    """Fills one of `options` and keeps it in the context under `key`."""
    self.c[key] = value = self.fill(self.rng.choice(options))
    return value

  def cast(self, role: str, who: _Who) -> None:
    """Makes {role}, {role.he}, {role.him}, {role.his}, {role.self}, {role.kind}, {role.call}."""
    self.who[role] = who
    c = self.c
    c[role] = who.name
    for attr in ("he", "him", "his", "self", "kind", "call"):
      c[f"{role}.{attr}"] = getattr(who, attr)
    if role == "helper":  # how a helper is named on first appearance
      c["helper.first"] = c["friend.intro"] if who is self.who.get("friend") else who.name
    if role == "hero":  # the hero's pronouns are the plain {he}, {him}, {his}, {self}
      c["he"], c["him"], c["his"], c["self"] = who.he, who.him, who.his, who.self

  # --- sentences
  def n(self, *options: str) -> None:
    """Narrates one of `options`, avoiding a sentence the story already has."""
    for _ in range(3):
      s = _cap(self.fill(self.rng.choice(options)))
      if s not in self.narrated:
        break
    self.narrated.add(s)
    self.paras[-1].append(s)
    self.last_speaker = None

  def say(self, role: str, *options: str, verb: str | None = None, mood: str | None = None) -> None:
    """One of `options` spoken by `role`, with varied attribution."""
    rng, who = self.rng, self.who[role]
    line = _cap(self.fill(rng.choice(options)))
    end = line[-1]
    verb = verb or self._verb(end, mood)
    if mood and verb in ("said", "asked") and rng.random() < 0.4:
      verb += " " + rng.choice(_MOODS[mood])
    use_pronoun = self.last_speaker is who and rng.random() < 0.7
    speaker = who.he if use_pronoun else who.name
    comma_line = line[:-1] + "," if end == "." else line
    r = rng.random()
    if r < 0.15:  # split: "Oh no!" said Mia. "My ball is gone."
      m = _SPLIT.search(line)
      if m:
        first, rest = line[:m.end(1)], line[m.end():]
        if first[-1] != end:  # the attribution follows the first sentence
          verb = self._verb(first[-1], mood)
        first = first[:-1] + "," if first[-1] == "." else first
        self.paras[-1].append(f'"{first}" {self._after(speaker, verb, use_pronoun)}. "{rest}"')
        self.last_speaker = who
        return
    if r < 0.75:
      s = f'"{comma_line}" {self._after(speaker, verb, use_pronoun)}.'
    else:
      s = f'{_cap(speaker)} {verb}, "{line}"'
    self.paras[-1].append(s)
    self.last_speaker = who

  def _verb(self, end: str, mood: str | None) -> str:
    if end == "?":
      return "asked"
    if end == "!":
      return self.rng.choice(_EXCLAIM.get(mood, _EXCLAIM[None]))
    return "said"

  def _after(self, speaker: str, verb: str, pronoun: bool) -> str:
    # "said Mia" reads well after a quote; "said she" does not.
    if not pronoun and " " not in verb and self.rng.random() < 0.5:
      return f"{verb} {speaker}"
    return f"{speaker} {verb}"

  def stranger(self) -> None:
    """A passer-by: {stranger.first} is "a kind old man", later {stranger} is "the kind old man"."""
    first, pronoun = self.pick(STRANGERS)
    self.cast("stranger", _Who("the " + first.split(" ", 1)[1], pronoun))
    self.c["stranger.first"] = first

  def season(self, season: str, weather: str | None = None) -> None:
    """Sets the season (and weather); {when} is drawn again to match."""
    self.c["season"] = season
    self.c["weather"] = weather or self.pick(SEASON_WEATHER[season])
    self.c["when"] = self.fill(self.pick(_WHENS))

  def mentioned(self, text: str) -> bool:
    """Whether the story so far contains `text`."""
    return any(text in s for p in self.paras for s in p)

  def para(self) -> None:
    if self.paras[-1]:
      self.paras.append([])

  def text(self) -> str:
    story = "\n".join(" ".join(p) for p in self.paras if p)
    return _ARTICLE.sub(_fix_article, story)

  # --- shared story parts
  def toy(self, toys=TOYS) -> None:
    """Picks the story's toy: {toy} ("red ball"), {toy.n} ("ball"), {toy.play}."""
    noun, play = self.pick(toys)
    r = self.rng.random()
    if r < 0.5:
      desc = f"{self.pick(COLORS)} {noun}"
    elif r < 0.75:
      desc = f"{self.pick(TOY_ADJECTIVES)} {noun}"
    else:
      desc = f"{self.pick(TOY_ADJECTIVES)} {self.pick(COLORS)} {noun}"
    self.c.update({"toy": desc, "toy.n": noun, "toy.play": play})

  def setting(self, places) -> str:
    """Picks a place: {place}, {place.at} ("at the park"), {place.to}, {sight}."""
    if self.animal:
      places = [p for p in places if p in ANIMAL_PLACES] or list(ANIMAL_PLACES)
    place = self.pick(places)
    prep, _, sights = PLACES[place]
    the = "" if place == "school" else "the "  # "at school", but "at the park"
    self.c.update({"place": place, "place.at": f"{prep} {the}{place}", "place.to": f"to {the}{place}",
                   "place.the": f"{the}{place}",
                   "sight": self.pick(sights)})
    return place

  def intro(self, traits=TRAITS, weather: bool = True) -> None:
    """Opening: who the hero is, sometimes where and when; may set {when}."""
    c, r = self.c, self.rng.random() if weather else 1.0
    c["trait"] = self.pick(traits)
    self.set("hobby", *(ANIMAL_HOBBIES if self.animal else HOBBIES))
    if r < 0.18:
      self.n("It was a {weather} {season} {tod}.", "It was a {weather} {tod} in {season}.",
             "The {tod} was {weather}, and {season} was here.")
      self.n("{hero} was a {trait} {hero.desc} who lived {hero.lives}.",
             "{hero}, a {trait} {hero.desc}, [woke up early|jumped out of bed|was wide awake].",
             "{hero} was [in a happy mood|ready to play|full of energy].")
      self.set("when", "That day", "Soon", "Before long", "Later that {tod}")
      return
    if r < 0.32 and not self.animal:
      return  # no introduction: "One day, Lily went to the park." / "Lily had a red ball."
    self.n("Once upon a time, there was a {hero.desc} named {hero}.",
           "Once upon a time, there was a {trait} {hero.kind} named {hero}.",
           "There once was a {hero.desc} called {hero}.",
           "Once upon a time, {hero.lives}, there lived a {hero.desc} named {hero}.",
           "{hero} was a {trait} {hero.kind}.",
           "{hero} was a {hero.desc} who lived {hero.lives}.",
           "There was a {trait} {hero.kind} named {hero} who lived {hero.lives}.",
           "{hero} was a {hero.desc} with a big smile.",
           "Once there was a {hero.desc}. {his} name was {hero}.",
           "This is a story about a {trait} {hero.kind} named {hero}.",
           "Not long ago, {hero.lives}, there was a {hero.desc} called {hero}.",
           "{hero} was a {trait} {hero.kind} who loved to {hobby}.",
           "Have you ever met {hero}? {he} was a {trait} {hero.kind}.",
           "Long ago, {hero.lives}, there lived a {trait} {hero.kind} named {hero}.")
    if self.chance(0.55) and not self.mentioned(c["hobby"]):
      extra = ["{he} loved to {hobby}.", "{he} liked to {hobby} [more than anything|every day].",
               "Every day, {hero} liked to {hobby}.", "{his} favorite thing was to {hobby}.",
               "{his} favorite color was {color}."]
      if not self.animal:
        extra += ["{he} was [four|five|six|seven] years old.", "{he} had a {pet.kind} named {pet}."]
        if not self.mentioned(c["hero.lives"]):
          extra.append("{he} lived with {his} family {hero.lives}.")
      self.n(*extra)

  def scene(self, p: float = 0.5) -> None:
    """Sometimes a line about the weather or what the hero sees there."""
    if self.rng.random() >= p:
      return
    if self.chance(0.5):
      self.n(*WEATHER_LINES[self.c["weather"]])
    else:
      self.n("{place.at}, {hero} saw {sight}.", "{hero} [looked around|stopped] and saw {sight}.",
             "{hero} could see {sight}.", "There was so much to see, like {sight}.")

  def search(self, spots, k: int) -> list:
    """They look in `k` of `spots` for {lost} without finding it; returns the spots left."""
    looked = self.rng.sample(spots, k)
    rng = self.rng
    templates = [rng.choice(_SEARCH_FIRST)] + rng.sample(_SEARCH_NEXT, k - 2) + [rng.choice(_SEARCH_LAST)]
    for spot, template in zip(looked, templates):
      self.c["spot"] = self.fill(spot)
      self.c["junk"] = self.pick(JUNK)
      self.n(template)
    return [s for s in spots if s not in looked]

  def lesson(self, theme: str, p: float = 0.65) -> None:
    if self.rng.random() >= p:
      return
    self.c["truth"] = self.pick(LESSONS[theme])
    if self.chance(0.35) and self.mentioned(self.c["adult"]):
      self.say("adult", "[You see|Remember|Always remember], {truth}.", "{hero}, {truth}.",
               "I'm proud of you, {hero}. [You see|Now you know], {truth}.", mood="kind")
    else:
      self.n("{hero} learned that {truth}.", "That day, {hero} learned that {truth}.",
             "Now {hero} knew that {truth}.", "{hero} [understood|saw] that {truth}.",
             "{hero} would always remember that {truth}.")

  def end(self, *after: str, closers=CLOSERS) -> None:
    """Closing: what the hero does from then on (plot specific), and/or a generic closer."""
    said_after = after and self.chance(0.55)
    if said_after:
      self.c["after"] = self.fill(self.pick(after))
      self.n("From that day on, {hero} {after}.", "After that, {hero} {after}.",
             "And from then on, {hero} {after}.", "Ever since that day, {hero} {after}.")
    if not said_after or self.chance(0.35):
      if closers is CLOSERS and self.c.get("place", "home") != "home":
        closers = OUTDOOR_CLOSERS
      self.n(*closers)


# Searching in order: a first place, maybe more, a last one.
_SEARCH_FIRST = (
  "They looked {spot}, but {lost} was not there.",
  "{hero} looked {spot} first. [{lost.it} was not there.|There was only {junk}.]",
  "First, they [peeked|looked] {spot}. [Nothing but {junk}.|Empty!]",
)
_SEARCH_NEXT = (
  "Next, they [checked|searched] {spot}. [They only found {junk}.|No luck.]",
  "What about {spot}? [No, not there.|They found only {junk}.|Not there either.]",
  "Then they looked {spot}. [Still nothing.|Only {junk}.]",
)
_SEARCH_LAST = (
  "They even looked {spot}. [But {lost} was not there.|They found {junk}, but not {lost}.]",
  "Last, they [tried|looked] {spot}. [Not there either.|Still no {lost.n}.]",
)
# Verbs for lines ending in "!", by mood.
_EXCLAIM = {
  None: ("said", "said", "shouted", "cried"),
  "happy": ("said", "laughed", "cheered", "said"),
  "sad": ("cried", "sobbed", "said"),
  "scared": ("cried", "shouted", "gasped"),
  "excited": ("shouted", "said", "cried", "squealed"),
  "cross": ("shouted", "snapped", "said"),
  "kind": ("said",),
}
_MOODS = {
  "sad": ("sadly", "quietly", "with a sniff", "in a small voice"),
  "happy": ("happily", "with a big smile", "with a laugh", "with a grin"),
  "kind": ("gently", "softly", "kindly", "with a smile"),
  "scared": ("in a shaky voice", "quietly", "with a gulp", "in a tiny voice"),
  "excited": ("happily", "with a big smile", "excitedly", "with shining eyes"),
  "cross": ("crossly", "with a frown", "loudly", "with a huff"),
}

# ----------------------------------------------------------------------------- plots
# Each plot narrates a whole story into a _Tale whose cast and setting are drawn.


def _lost_toy(t: _Tale) -> None:
  """A toy goes missing; a search with a helper; found; be careful with your things."""
  t.toy()
  t.intro()
  t.n("{hero} had a {toy}. [{he} loved it very much.|It was {his} favorite toy.|{he} took it everywhere.]",
      "{hero}'s favorite toy was a {toy}.",
      "{hero} had a {toy} that {he} loved more than anything.",
      "[{his} grandma|{his} grandpa|{adult}] had given {him} a {toy} [for {his} birthday|last summer|"
      "a long time ago], and {he} loved it [very much|so much].")
  at_home = not t.animal and t.chance(0.35)
  t.c.update({"lost": "the " + t.c["toy.n"], "lost.it": "it", "lost.n": t.c["toy.n"]})
  if at_home:
    spots = HOME_SPOTS
    t.n("{when}, {hero} wanted to play with {his} {toy.n}.",
        "{when}, {hero} [came home from school|woke up from {his} nap] and looked for {his} {toy.n}.")
    t.n("But it was not in {his} toy box!", "But the {toy.n} was not on {his} bed, where {he} had left it.",
        "But when {he} looked, it was [gone|not there]!")
  else:
    spots = PLACES[t.setting(PLAY_PLACES)][1]
    t.n("{when}, {hero} took {his} {toy.n} {place.to}.",
        "{when}, {hero} and {his} {toy.n} went {place.to} [to play|together].",
        "{when}, {hero} [brought|took] {his} {toy.n} along when {he} went {place.to}.")
    t.scene()
    t.n("{he} {toy.play} [for a long time|again and again|and laughed].",
        "[At first|For a while], {he} {toy.play}.", "{hero} {toy.play}. It was so much fun!")
    t.n("Then {he} put it down for a moment to [watch a butterfly|eat {his} {food}|tie {his} shoe|"
        "chase a bird|look at the clouds|pick a flower].",
        "Then {hero} saw [a butterfly|a funny bird|a big dog], and {he} [ran|went] to look, leaving the "
        "{toy.n} behind.")
    t.n("When {he} came back, the {toy.n} was gone!", "When {he} turned around, {his} {toy.n} was not there!",
        "But when {he} looked back, it was gone!")
  t.say("hero", "Oh no! Where is my {toy.n}?", "My {toy.n} is gone!", "Where did my {toy.n} go?",
        "Oh no! I can't find my {toy.n}!", mood="sad")
  t.n("{hero} felt [very sad|so sad|worried|upset]. [{his} eyes filled with tears.|{he} wanted to cry.|]",
      "{hero}'s eyes filled with tears.", "{hero} sat down and [began to cry|felt like crying].")
  helper = "friend" if t.chance(0.4) else "adult"
  t.cast("helper", t.who[helper])
  if helper == "friend":
    t.n("Just then, {friend.intro} came by.", "Then {friend.intro} [walked over|ran up|came to see what was wrong].")
  else:
    t.n("{adult} [saw {him} and came over|heard {him} and came to help|came to see what was wrong].")
  if t.chance(0.75):
    t.say("helper", "What's wrong, {hero}?", "Why are you sad, {hero}?", "{hero}, what happened?")
    t.say("hero", "I lost my {toy.n}!", "My {toy.n} is gone, and I can't find it.",
          "I can't find my {toy.n} anywhere.", mood="sad")
    t.say("helper", "Don't worry. I will help you look.", "Let's look for it together!",
          "We will find it. Where did you see it last?", mood="kind")
  else:
    t.n("{hero} told {helper} what had happened, and {helper.he} said {helper.he} would help.")
  spots = t.search(spots, t.pick((2, 2, 3)))
  t.para()
  ending = t.rng.random()
  if at_home and t.who["pet"].kind in ("dog", "puppy", "cat", "kitten") and ending < 0.35:
    t.n("Then they heard a noise. It was {pet} the {pet.kind}!",
        "Just then, {pet} the {pet.kind} came [running|trotting] in.")
    t.n("{pet} had the {toy.n} [in {pet.his} mouth|between {pet.his} paws]! {pet.he} wanted to play too.",
        "{pet.he} had taken the {toy.n} to {pet.his} bed [to sleep with it|to keep it safe].")
    t.say("hero", "{pet}, you silly {pet.kind}!", "So that's where it was!", mood="happy")
  elif not at_home and ending < 0.4:
    t.stranger()
    t.n("Just then, {stranger.first} walked up. {stranger.he} was holding the {toy.n}!",
        "Then {stranger.first} came over with something in {stranger.his} hand. It was the {toy.n}!")
    t.say("stranger", "Is this yours? I found it [by the path|near the gate|on the grass].",
          "Did somebody lose this {toy.n}?")
    t.say("hero", "Yes! Thank you so much!", "That's mine! Thank you!", mood="happy")
  else:
    t.c["spot"] = t.fill(t.pick(spots))
    t.n("At last, {hero} looked {spot}, and there it was!", "Then {helper} looked {spot}. There was the {toy.n}!",
        "Finally, {hero} saw something {spot}. It was {his} {toy.n}!")
  t.n("{hero} hugged {his} {toy.n} tight. [{he} was so happy!|{he} smiled from ear to ear.|]",
      "{hero} [jumped for joy|laughed and laughed|danced around]. {his} {toy.n} was back!")
  if helper == "friend" or t.chance(0.5):
    t.say("hero", "Thank you for helping me, {helper.call}!", "Thank you, {helper.call}!",
          "You are the best, {helper.call}!", mood="happy")
  t.lesson(t.pick(("care", "helping")))
  t.end("kept {his} {toy.n} [close|safe]", "always put {his} {toy.n} in a safe place",
        "never left {his} {toy.n} behind again")


def _sharing(t: _Tale) -> None:
  """The hero won't share a new toy, feels bad playing alone, shares, and it is more fun."""
  t.toy()
  if not t.animal and t.chance(0.35):
    sib = t.who["friend"]
    t.c["friend.intro"] = f"{t.c['his']} little {'brother' if sib.he == 'he' else 'sister'} {sib.name}"
  t.intro()
  t.n("{hero} got a new {toy} [for {his} birthday|from {his} grandma|as a present].",
      "{hero} had a {toy}. It was brand new.", "{adult} had just given {hero} a {toy}.")
  t.n("{he} loved it [so much|very much]. [{he} did not want anyone else to touch it.|{he} played with it all day.|]",
      "It was the best toy {he} had ever had.", "{he} {toy.play} all day long.")
  at_home = t.animal or t.chance(0.5)
  if at_home:
    t.n("{when}, {friend.intro} came over to play.", "{when}, {friend.intro} came to visit.")
  else:
    t.setting(PLAY_PLACES)
    t.n("{when}, {hero} took the {toy.n} {place.to}. There {he} met {friend.intro}.",
        "{when}, {hero} was playing with the {toy.n} {place.at} when {friend.intro} came by.")
  t.n("{friend} saw the {toy.n} and {friend.his} eyes lit up.", "{friend} looked at the {toy.n} for a long time.")
  t.say("friend", "Can I play with your {toy.n}?", "Wow, what a nice {toy.n}! Can I have a turn?",
        "May I try it, please?", "That looks fun! Can we play with it together?")
  t.say("hero", "No! It's mine!", "No, it's my {toy.n}!", "Not now. I'm playing with it.",
        "No. It's new, and you might break it.", mood="cross")
  t.n("{friend} looked sad. {friend.he} sat down [by {friend.self}|on the floor|in the corner] and looked at the ground.",
      "{friend}'s face fell. {friend.his} eyes filled with tears.",
      "{friend} did not say anything. {friend.he} just looked down at {friend.his} feet.")
  t.n("{hero} played with the {toy.n}, but it was not [as fun as before|much fun alone].",
      "{hero} {toy.play}, but somehow it did not feel good.",
      "{hero} kept playing, but {he} felt a funny feeling in {his} tummy.")
  if t.chance(0.45):
    t.n("{adult} had seen everything.", "{adult} came over and sat next to {hero}.")
    t.say("adult", "{hero}, how do you think {friend} feels?", "How would you feel if {friend} did not share with you?",
          "Toys are more fun with a friend. What do you think?", mood="kind")
  t.n("{hero} thought about it. Then {he} [walked over to|went to] {friend}.",
      "{hero} looked at {friend}. {he} knew what to do.", "{hero} took a deep breath and went over to {friend}.")
  t.say("hero", "Do you want to play with my {toy.n} together?", "Here, you can have a turn.",
        "I'm sorry. Let's share!", "We can take turns. You go first!")
  t.n("{friend}'s face lit up.", "{friend} smiled a big smile.", "{friend} wiped {friend.his} eyes and smiled.")
  t.say("friend", "Thank you, {hero}!", "Really? Thank you!", "You are a good friend, {hero}.", mood="happy")
  t.n("They took turns with the {toy.n}. First {hero}, then {friend}.",
      "They played with the {toy.n} together [all afternoon|until dinner time|for a long time].",
      "Together they [laughed and played|made up a new game with the {toy.n}].")
  if t.chance(0.4):
    t.n("Then {friend} shared {friend.his} {food} with {hero}. [It was yummy.|They ate it together.]",
        "Later, {friend} let {hero} play with {friend.his} [kite|jump rope|puzzle|crayons] too.")
  t.n("It was much more fun than playing alone.", "Playing together was the best part of the day.",
      "{hero} felt warm and happy inside.")
  t.lesson("sharing")
  t.end("always shared {his} toys", "loved to play with {friend}",
        "shared {his} {toy.n} with {his} friends")


# What frightens the hero, how it looks, who helps, what brave thing is done. "animal":
# whether an animal hero fits (True), or only one does ("only").
FEARS = (
  dict(animal=True, place=None,
       setup=("{hero} was afraid of the dark.", "{hero} did not like the dark. It made {him} feel very small."),
       scare=("One night, {adult} turned off the light and said good night. The room was very dark.",
              "That night, the wind was blowing, and {hero} saw a big shadow on the wall.",
              "One night, {hero} heard a [creak|tap tap tap|strange noise] in the dark. {he} pulled the blanket over {his} head."),
       cry=("{adult.call}! I'm scared!", "{adult.call}, there's a monster in my room!",
            "I don't like the dark. Can you stay with me?"),
       help=("Let's look together. There is nothing to be afraid of.",
             "The dark is just the room with the lights off. Everything is still the same.",
             "Let me show you something."),
       act=("{adult} turned on the light. The big shadow was just {his} coat hanging on the door!",
            "They looked under the bed and in every corner. There were only toys and [socks|shoes|books].",
            "{adult} gave {hero} a little flashlight. {hero} shone it all around. There were no monsters anywhere."),
       win=("{hero} laughed. It did not seem so scary now.",
            "{hero} took a deep breath and closed {his} eyes. Soon {he} was fast asleep."),
       after=("was not afraid of the dark anymore", "slept with a little flashlight under {his} pillow, just in case")),
  dict(animal=True, place=None,
       setup=("{hero} did not like storms.", "Loud noises made {hero} jump."),
       scare=("One night, there was a big storm. Thunder went BOOM, and the windows shook.",
              "{when}, dark clouds came, and then came the thunder. Crash! Boom!"),
       cry=("{adult.call}! The thunder is so loud!", "Make it stop! I'm scared!"),
       help=("Thunder is just the sound the clouds make. It can't hurt you in here.",
             "Let's count together. When the count gets longer, the storm is going away."),
       act=("{hero} and {adult} counted after each flash. One, two, three, four, five. The counts got longer and longer.",
            "They sat together under a warm blanket and listened to the rain. {adult} told {him} a story."),
       win=("Soon the thunder was far away, just a soft rumble.", "After a while, the storm was gone, and the sky was quiet."),
       after=("was not scared of storms", "counted the seconds whenever {he} heard thunder")),
  dict(animal=False, place=("park",),
       setup=("{hero} was scared of big dogs.", "Big dogs made {hero} nervous."),
       scare=("{when}, {hero} was {place.at} when a big dog came running up to {him}. It barked, WOOF!",
              "{when}, a huge dog [with floppy ears|with a wagging tail] ran up to {hero} {place.at}."),
       cry=("Help! Go away, dog!", "{adult.call}! A big dog!"),
       help=("This is Bruno. He is very friendly. Would you like to say hello?",
             "Don't worry, he just wants to play. Hold out your hand slowly."),
       helper="owner",
       act=("{hero} held out {his} hand. The dog sniffed it and then licked it. It tickled!",
            "{hero} slowly patted the dog's soft head. The dog wagged its tail and rolled over."),
       win=("{hero} giggled. The big dog was not scary at all. He was a big, soft friend.",
            "Soon {hero} was throwing a stick, and the dog was bringing it back again and again."),
       after=("said hello to every dog {he} met", "was not scared of big dogs")),
  dict(animal=False, place=("playground",),
       setup=("{hero} wanted to go down the big slide, but it was very tall.",
              "The big slide at the playground was the tallest slide {hero} had ever seen."),
       scare=("{when}, {hero} climbed up the ladder. At the top, {he} looked down. It was so high!",
              "{when}, {hero} climbed all the way to the top of the big slide. The ground looked very far away."),
       cry=("I can't do it! It's too high!", "I want to go back down!"),
       help=("You can do it! I will be right here at the bottom.", "Hold on to the sides and go slowly."),
       act=("{hero} sat down and held on tight. Then {he} let go. Whoosh!",
            "{hero} counted to three. One, two, three! And down {he} went."),
       win=("{hero} landed at the bottom with a bump and a big smile.",
            "It was fast and fun! {hero} laughed all the way down."),
       after=("loved the big slide", "went down the big slide again and again")),
  dict(animal=False, place=("beach",),
       setup=("{hero} loved the beach, but {he} was afraid of the big waves.",
              "{hero} liked sand, but the sea was big and loud."),
       scare=("{when}, the family went {place.to}. The waves came in with a roar and splashed on the sand.",
              "{when}, {hero} stood {place.at} and watched the waves crash. {he} stepped back."),
       cry=("The waves are too big!", "I don't want to go in. The water is scary."),
       help=("Let's hold hands and just put our toes in.", "We can stay where the water is small. I'll hold your hand."),
       act=("{hero} held {adult}'s hand, and they walked to the edge. A little wave tickled {his} toes.",
            "{hero} took one small step, then another. The water was cool and bubbly around {his} feet."),
       win=("{hero} giggled and jumped over the next little wave.", "Soon {hero} was splashing and laughing."),
       after=("loved to jump over the little waves", "was not afraid of the sea")),
  dict(animal=False, place=("school",),
       setup=("{hero} was going to start school.", "It was {hero}'s first day at a new school."),
       scare=("{when}, {hero} stood at the door of the classroom. There were so many children {he} did not know.",
              "{when}, {hero} walked into school. {his} tummy felt full of butterflies."),
       cry=("What if nobody likes me?", "{adult.call}, I want to go home."),
       help=("Everyone feels a bit scared on the first day. Just smile and say hello.",
             "You are kind and funny. You will make friends, you'll see."),
       act=("{hero} took a deep breath and sat next to a girl with a big smile. The girl showed {hero} her drawing.",
            "The teacher smiled at {hero}. A boy asked if {hero} wanted to play with the blocks."),
       win=("By lunchtime, {hero} had two new friends.", "When the day was over, {hero} did not want to go home!"),
       after=("loved going to school", "ran to school every morning")),
  dict(animal=True, place=("forest", "river"),
       setup=("{hero} was scared of the old bridge over the stream.", "{hero} never crossed the wobbly bridge."),
       scare=("{when}, {hero} wanted to visit {friend.intro} on the other side of the stream. {he} had to cross the wobbly bridge.",
              "{when}, {hero} stood at the wobbly bridge. The water rushed below, and the bridge swayed."),
       cry=("What if I fall in?", "It's too wobbly!"),
       help=("Look at the other side, not down at the water. Take one small step at a time.",
             "Hold on to the rope, and go slowly. I'll go right behind you."),
       act=("{hero} held the rope and took one step, then another. The bridge wobbled, but it held.",
            "{hero} looked straight ahead and walked slowly across."),
       win=("Soon {hero} was on the other side!", "{hero} reached the other side and did a happy dance."),
       after=("crossed the bridge all by {self}", "was proud of how brave {he} had been")),
  dict(animal=True, place=("garden", "meadow"),
       setup=("{hero} was afraid of bees.", "Whenever a bee came near, {hero} ran away."),
       scare=("{when}, {hero} was playing {place.at} when a big, fuzzy bee landed right next to {him}.",
              "{when}, a bee buzzed around {hero}'s head. Bzzz, bzzz!"),
       cry=("A bee! Help!", "Go away, bee!"),
       help=("Stay still and calm. The bee only wants the flowers.",
             "Bees are our friends. They help the flowers grow. If you are gentle, the bee will be gentle too."),
       act=("{hero} stood very still. The bee flew to a flower and drank from it.",
            "{hero} watched the bee. It rolled in the yellow dust of a flower and flew away."),
       win=("{hero} smiled. The bee was busy, not mean.", "The bee did not even look at {hero}."),
       after=("watched the bees [with a smile|from a safe place] instead of running away", "was not afraid of bees")),
  dict(animal=False, place=None,
       setup=("{hero} had to go to the doctor.", "{hero} did not like going to the doctor."),
       scare=("{when}, {hero} and {adult} sat in the waiting room. {hero} held {adult}'s hand very tight.",
              "{when}, it was time for {hero}'s checkup. The doctor's room smelled funny."),
       cry=("What will the doctor do?", "I don't want to go in!"),
       help=("The doctor will just check that you are healthy and strong.",
             "I'll be right next to you the whole time."),
       act=("The doctor was a kind lady with funny glasses. She listened to {hero}'s heart. Thump, thump!",
            "The doctor let {hero} listen to {his} own heart. Then she looked in {his} ears."),
       win=("It was over so fast! The doctor gave {hero} a sticker with a star on it.",
            "When it was over, {hero} got a sticker and a high five."),
       after=("was not scared of the doctor", "wanted to be a doctor when {he} grew up")),
  dict(animal="only", place=("forest",),
       setup=("{hero} was afraid of the deep, dark forest at night.", "At night, the forest made strange noises."),
       scare=("One evening, {hero} heard a loud noise in the forest. Hooo! Hooo!",
              "That evening, {hero} heard something say Hooo from a tree. {his} fur stood up."),
       cry=("Who is there?", "Wh-who is there?"),
       help=("Let's go and see together. I'll hold your paw.", "Sometimes sounds are scarier than the thing that makes them."),
       act=("They walked to the tree. On a branch sat an old owl with big, round eyes.",
            "They peeked up at the tree. It was just an owl, blinking and saying hello."),
       win=("The owl hooted hello, and {hero} laughed.", "The owl told {hero} a story about the stars, and {hero} was not scared anymore."),
       after=("visited the owl every evening", "was not afraid of the night sounds")),
)


def _fear(t: _Tale) -> None:
  """A fear meets a helper's advice and a brave small step."""
  fears = [f for f in FEARS if (f["animal"] if t.animal else f["animal"] != "only")]
  f = t.pick(fears)
  if f["place"]:
    t.setting(f["place"])
  daytime = not any("night" in s or "evening" in s for s in f["scare"])
  t.intro(traits=tuple(x for x in TRAITS if x not in ("busy",)), weather=daytime)
  t.n(*f["setup"])
  if t.chance(0.5):
    t.n("{he} tried to be brave, but it was hard.", "Just thinking about it made {his} knees shake.",
        "{he} wished {he} could be brave like {friend}.", "It was the one thing {hero} was scared of.")
  t.para()
  t.n(*f["scare"])
  t.say("hero", *f["cry"], mood="scared")
  t.n("{hero}'s [heart was beating fast|knees were shaking|hands were shaking].", "{hero} wanted to run away.",
      "{hero} felt very small and very scared.", "{hero} froze.")
  if f.get("helper") == "owner":
    t.cast("helper", _Who("the dog's owner", t.pick(("he", "she"))))
    t.n("Then the dog's owner came running over.", "The dog's owner hurried over with a leash.")
  else:
    t.cast("helper", t.who["adult"])
    t.n("{adult} [hugged {him}|held {his} hand|knelt down next to {him}].",
        "{adult} came and sat next to {hero}.")
  t.say("helper", *f["help"], mood="kind")
  if t.chance(0.5):
    doubt, answer = t.pick((("But what if I can't?", "I know you can do it."),
                            ("Are you sure?", "I'm sure. You are braver than you think."),
                            ("Will you stay with me?", "I'm right here with you.")))
    t.say("hero", doubt, mood="scared")
    t.say("helper", answer, mood="kind")
  t.n("{hero} took a deep breath.", "{hero} thought about it for a moment.",
      "{hero} was still a little scared, but {he} decided to try.")
  t.n(*f["act"])
  t.n(*f["win"])
  if t.chance(0.6):
    t.say("hero", "I did it!", "That wasn't scary at all!", "I'm not scared anymore!", "I was brave!",
          mood="happy")
  t.lesson("bravery")
  t.end(*f["after"])


# Why a friend is sad: (what happened, what the friend says).
SAD_REASONS = (
  ("{friend.his} balloon had flown away into the sky", "My balloon flew away, and now it's gone."),
  ("{friend} had dropped {friend.his} ice cream on the ground", "My ice cream fell on the ground."),
  ("{friend.his} grandma had gone home to a town far away", "I miss my grandma. She lives so far away."),
  ("nobody had asked {friend} to play", "Nobody wants to play with me."),
  ("{friend} had fallen and scraped {friend.his} knee", "I fell down, and my knee hurts."),
  ("the rain had washed away {friend.his} chalk drawing", "The rain washed away my drawing."),
  ("{friend.his} kite was stuck high in a tree", "My kite is stuck, and I can't reach it."),
  ("{friend} had lost a game and felt left out", "I always lose. I'm no good at games."),
  ("{friend.his} best friend had moved away", "My best friend moved away, and now I'm all alone."),
  ("{friend} had spilled juice all over {friend.his} new shirt", "I spilled juice on my new shirt."),
  ("{friend.his} tower had fallen down", "My tower fell down, and it took so long to build."),
  ("{friend} was too small to reach the swing", "Everyone can reach the swing but me."),
)
# Ways to cheer someone up: (what the hero does, how the friend reacts).
CHEER_IDEAS = (
  ("told {friend} a funny joke about a [cow|duck|frog|pig] who wanted to [fly|dance|wear a hat]",
   "{friend} giggled."),
  ("drew a picture of {friend} [with a big smile|riding a rainbow|as a superhero] and gave it to {friend.him}",
   "{friend} looked at the picture and smiled."),
  ("shared {his} {food} with {friend}", "{friend} took a bite and smiled a little."),
  ("sang a silly song about [a dancing cat|a sleepy moon|a bunny in boots]", "{friend} started to laugh."),
  ("made {his} funniest face, with {his} tongue out and {his} eyes crossed", "{friend} burst out laughing."),
  ("picked a pretty [yellow|purple|white] flower and gave it to {friend}", "{friend} held the flower and smiled."),
  ("gave {friend} a big, warm hug", "{friend} hugged {hero} back."),
  ("asked {friend} to play [tag|hide and seek|catch] with {him}", "{friend} jumped up and nodded."),
  ("did a funny dance, hopping like a frog", "{friend} could not stop giggling."),
  ("told {friend} a story about a brave little mouse", "{friend} listened and forgot to be sad."),
)


def _cheer_up(t: _Tale) -> None:
  """A friend is sad; the hero tries one or two ways to help until the friend smiles."""
  reason, reason_line = t.pick(SAD_REASONS)
  t.c["reason"] = t.fill(reason)
  t.intro()
  t.n("{hero} had a friend named {friend}.", "{hero}'s best friend was {friend}.",
      "{hero} and {friend} were good friends.")
  t.setting(PLAY_PLACES)
  t.n("{when}, {hero} went {place.to}.", "{when}, {hero} was playing {place.at}.",
      "{when}, {hero} [ran|skipped|walked] {place.to} to play.")
  t.scene(0.4)
  t.n("There {he} saw {friend} sitting all alone.", "{he} saw {friend} sitting by {friend.self}.",
      "{friend} was there too, but {friend.he} was not playing.")
  t.n("{friend} looked [very sad|unhappy|so sad]. [A tear rolled down {friend.his} cheek.|]",
      "{friend}'s head was down, and {friend.he} was [crying|sniffing].")
  t.say("hero", "What's wrong, {friend}?", "Why are you sad, {friend}?", "{friend}, are you okay?")
  t.say("friend", reason_line, mood="sad")
  t.n("[Oh no!|Poor {friend}!] {reason}.", "{reason}, and {friend.he} felt [very|so] sad.")
  t.n("{hero} wanted to help. [{he} thought and thought.|But how?|]",
      "{hero} thought hard. How could {he} make {friend} smile?")
  ideas = t.rng.sample(CHEER_IDEAS, 2)
  if t.chance(0.5):  # the first try does not quite work
    t.c["idea"] = t.fill(ideas[1][0])
    t.n("First, {hero} {idea}.")
    t.n("But {friend} was still sad.", "{friend} tried to smile, but {friend.he} was still sad.",
        "It did not work. {friend} only looked down.")
    t.n("{hero} did not give up.", "{hero} thought again.", "{hero} tried something else.")
  t.c["idea"] = t.fill(ideas[0][0])
  t.n("{hero} {idea}.", "Then {hero} had an idea. {he} {idea}.", "So {hero} {idea}.")
  t.n(ideas[0][1])
  t.say("friend", "Thank you, {hero}. I feel better now.", "You are a good friend, {hero}.",
        "Thank you! You always know how to make me smile.", mood="happy")
  t.n("Soon they were playing together again.", "They played together until it was time to go home.",
      "Then the two friends ran off to play.", "{friend} was smiling again, and so was {hero}.")
  t.lesson(t.pick(("kindness", "friendship")))
  t.end("was always there for {his} friends", "looked out for friends who seemed sad",
        "and {friend} were the best of friends")


# Things to build: (thing, where, how, what knocks it down, how to build it better (now, then), seasons).
BUILDS = (
  ("tower", ("home",), "with {his} [wooden|colorful] blocks, one on top of the other",
   ("{pet} ran by and bumped the tower", "{hero} put one more block on top, and the tower wobbled"),
   ("put the big blocks at the bottom and the small ones on top",
    "put the big blocks at the bottom and the small ones on top"), None),
  ("sandcastle", ("beach",), "with {his} bucket and spade, with towers and a wall",
   ("a big wave rolled in and washed the sandcastle away", "a dog ran right through the sandcastle"),
   ("build it farther from the water, with wet sand that sticks",
    "built it farther from the water, with wet sand that sticks"), ("spring", "summer", "fall")),
  ("snowman", ("park", "garden", "hill"), "by rolling three big balls of snow",
   ("the snowman's head rolled off", "the snowman leaned and fell over"),
   ("pack the snow tight and make the bottom ball the biggest",
    "packed the snow tight and made the bottom ball the biggest"), ("winter",)),
  ("fort", ("home",), "with pillows, blankets and two chairs",
   ("the blanket slipped, and the whole fort fell down", "{pet} jumped on the fort, and it fell down"),
   ("tie the corners of the blanket to the chairs", "tied the corners of the blanket to the chairs"), None),
  ("hut", ("forest", "meadow"), "with sticks and big leaves",
   ("a gust of wind blew the hut over", "a branch fell and knocked the hut down"),
   ("use thick sticks and lean them against a tree", "used thick sticks and leaned them against a tree"), None),
  ("dam", ("river", "pond"), "with sticks, stones and mud",
   ("the water pushed the dam apart", "a big splash broke a hole in the dam"),
   ("put the heavy stones at the bottom", "put the heavy stones at the bottom"), ("spring", "summer", "fall")),
  ("birdhouse", ("garden",), "with wood, a hammer and nails",
   ("the wind blew the birdhouse off the branch", "the roof of the birdhouse came loose and fell off"),
   ("nail it tight and tie it to the branch with string", "nailed it tight and tied it to the branch with string"),
   None),
  ("tower", ("river", "beach"), "with flat stones, one on top of the other",
   ("a stone slipped, and the tower tumbled down", "a dog splashed by, and the tower fell"),
   ("choose the flattest stones and go slowly", "chose the flattest stones and went slowly"), None),
)


def _build(t: _Tale) -> None:
  """Building something that falls down; trying again, better and together."""
  builds = [b for b in BUILDS if (b[5] is None or t.c["season"] in b[5])
            and not (t.animal and "home" in b[1])]
  thing, places, how, falls, better, seasons = t.pick(builds)
  if seasons == ("winter",):
    t.season("winter", "snowy")
  place = "home" if "home" in places else t.setting(places)
  t.c.update(thing=thing, how=t.fill(how), falls=t.fill(t.pick(falls)), better=better[0], did_better=better[1])
  t.intro()
  t.n("{hero} loved to build things.", "{hero} liked to make things with {his} own hands.",
      "More than anything, {hero} liked building.")
  if place == "home":
    t.n("{when}, {hero} decided to build a big {thing}.", "{when}, {hero} had an idea: {he} would build the biggest {thing} ever!")
  else:
    t.n("{when}, {hero} went {place.to} and decided to build a {thing}.",
        "{when}, {hero} went {place.to}. {he} wanted to build a big {thing}.")
    t.scene(0.4)
  t.n("{he} made it {how}.", "{hero} worked hard. {he} built it {how}.", "{he} built the {thing} {how}.")
  t.n("It took a long time, but at last it was done.", "It was [tall|big|beautiful] and strong.",
      "When it was finished, {hero} stepped back and smiled.")
  t.say("hero", "Look at my {thing}!", "It's the best {thing} in the world!", "I made it all by myself!",
        mood="happy")
  t.para()
  t.n("But then {falls}.", "Suddenly, {falls}.", "Just then, {falls}. Oh no!")
  t.n("{hero} [was so sad|felt like crying|was very upset]. All that work was gone!",
      "{hero} stared at the mess. {his} {thing} was gone.")
  t.say("hero", "It's ruined!", "Now I have to start all over again!", "I give up!", mood="sad")
  if t.chance(0.4):
    t.n("{hero} tried to build it again, but it fell down again.", "{he} tried again, but the {thing} wobbled and fell once more.")
  helper = t.pick(("friend", "adult"))
  t.cast("helper", t.who[helper])
  t.n("{helper.first} came over and looked at the mess.", "{helper.first} saw what had happened.")
  t.say("helper", "Don't give up! Let's build it again together.", "I know a trick. We can {better}.",
        "It was a great {thing}. Let's make an even better one!", mood="kind")
  t.n("So they tried again. This time they {did_better}.", "They started again. {helper} showed {hero} how to {better}.",
      "{hero} and {helper} worked together. They {did_better}.")
  t.n("The new {thing} was even [bigger|better|stronger] than before.",
      "This time, the {thing} stood tall and strong.", "Soon the {thing} was finished, and it did not fall!")
  t.say("hero", "We did it!", "It's even better now!", "Thank you, {helper.call}!", mood="happy")
  t.lesson(t.pick(("trying", "teamwork")))
  t.end("never gave up when things fell down", "loved building things with {helper}",
        "always tried again")


# Plans a rainy day spoils: (the plan, what they wanted to do there).
PLANS = (
  ("have a picnic in the park", "eat sandwiches on a big blanket"),
  ("go to the beach", "build sandcastles"),
  ("go for a bike ride", "ride all the way to the lake"),
  ("visit the zoo", "see the monkeys and the lions"),
  ("play ball in the garden", "kick the ball around"),
  ("fly {his} new kite on the hill", "watch the kite dance in the sky"),
  ("go to the farm", "feed the goats and the hens"),
  ("go fishing at the lake", "catch a big fish"),
)
# Indoor fun: (the idea as said, what they did).
RAINY_IDEAS = (
  ("How about we build a blanket fort?",
   "They put blankets over the chairs and crawled inside with a flashlight and a pile of books."),
  ("Let's bake some cookies!",
   "They mixed flour, sugar and butter, and soon the house smelled sweet and warm."),
  ("Why don't we paint some pictures?",
   "They painted a big yellow sun, a rainbow and a house with a red door."),
  ("Let's put on a puppet show!",
   "They made puppets out of old socks, with button eyes, and put on a funny show."),
  ("How about a board game?",
   "They played a game with dice and little colored pieces. {hero} won twice!"),
  ("Let's have a dance party!",
   "They turned on some music and danced and jumped and spun around until they were dizzy."),
  ("We can have a picnic right here on the floor!",
   "They spread the blanket on the living room floor and ate their sandwiches there, laughing."),
  ("Let's make a train track across the room!",
   "They built a long track that went under the table and around the sofa."),
)


def _rainy_day(t: _Tale) -> None:
  """Rain spoils a plan; an indoor idea turns the day into fun."""
  plan, plan_fun = t.pick(PLANS)
  idea, idea_done = t.pick(RAINY_IDEAS)
  t.season(t.c["season"], "rainy")
  t.c.update(plan=t.fill(plan), plan_fun=t.fill(plan_fun))
  t.intro()
  t.n("{hero} was very excited. Today {he} and {adult} were going to {plan}.",
      "{adult} had promised that today they would {plan}.",
      "All week, {hero} had been waiting to {plan}.")
  t.n("{hero} wanted to {plan_fun}.", "{he} could not wait to {plan_fun}.", "{he} was going to {plan_fun}!")
  t.para()
  t.n("But when {hero} looked out of the window that morning, it was raining.",
      "But that morning, {hero} woke up to the sound of rain. Pitter, patter!",
      "But that morning, big gray clouds filled the sky, and rain began to fall.")
  t.n(*WEATHER_LINES["rainy"])
  t.say("hero", "Oh no! Now we can't {plan}!", "It's not fair! Why does it have to rain today?",
        "Rain, rain, go away!", mood="sad")
  t.n("{hero} sat by the window and [sighed|frowned|pressed {his} nose to the glass].",
      "{hero} felt grumpy. {he} did not want to stay inside.")
  t.n("{adult} sat down next to {him}.", "{adult} saw {his} sad face and had an idea.")
  t.say("adult", "We can still have fun inside. " + idea, idea, mood="kind")
  t.n("{hero} was not sure, but {he} said yes.", "{hero} thought about it. Then {he} nodded.",
      "{hero}'s face lit up.")
  t.n(idea_done)
  if t.chance(0.5):
    t.n("{pet} the {pet.kind} joined in too.", "Even {pet} the {pet.kind} wanted to help.")
  t.n("{hero} laughed and laughed.", "It was so much fun that {hero} forgot all about the rain.",
      "{hero} had a wonderful time.")
  if t.chance(0.5):
    t.n("Later, the rain stopped, and a big rainbow appeared in the sky.",
        "In the afternoon, the sun came out. There was a rainbow over the houses!")
    t.say("hero", "Look! A rainbow!", "Can we go and jump in the puddles?", mood="excited")
    t.n("They put on their boots and splashed in the puddles.", "{hero} and {adult} watched the rainbow together.")
  t.say("hero", "This was the best rainy day ever!", "Can we {plan} tomorrow, and do this again?",
        "Rainy days are fun too!", mood="happy")
  t.lesson("making do")
  t.end("did not mind the rain", "liked rainy days almost as much as sunny ones")


def _race(t: _Tale) -> None:
  """A race; the hero helps a fallen friend, or loses and is a good sport, or practices and wins."""
  t.setting(("park", "meadow", "playground", "beach", "school"))
  t.c["goal"] = t.fill(t.pick(("the big tree", "the old fence", "the red flag", "the end of the path", "the finish line")))
  t.intro()
  t.n("{hero} loved to run. {he} was very fast.", "{hero} was the fastest runner {he} knew.",
      "{hero} liked to [run|race] more than anything.")
  ending = t.rng.random()
  t.c["kids"] = "animals" if t.animal else "children"
  if ending > 0.66:  # a race some days away: time to practice
    t.n("{when}, {hero} heard that there would be a big race {place.at} on {weekday}.",
        "{when}, {friend} said, \"Let's have a race on {weekday}!\"")
  else:
    t.n("{when}, there was a race {place.at}.", "{when}, the {kids} {place.at} decided to have a race.",
        "{when}, {friend} said, [\"Let's race!\"|\"I bet I can beat you!\"]")
  t.n("They would race to {goal}.", "The race would go all the way to {goal}.")
  t.say("hero", "I'm going to win!", "I will be first!", "I'm the fastest!", mood="excited")
  if ending > 0.66:
    t.n("But {friend} was fast too. {hero} knew {he} had to practice.",
        "But {hero} wanted to be ready.")
    t.n("Every day, {hero} ran [around the garden|up and down the street|to the park and back].",
        "{hero} practiced every morning. {he} ran and ran, until {he} was out of breath.")
  t.para()
  t.n("Everyone lined up. \"Ready, set, go!\" [said {adult}|shouted {friend}].",
      "All the children stood in a line. Ready, set, go!")
  t.n("{hero} {ran} as fast as {he} could.", "Off they went! {hero} ran and ran.",
      "{hero}'s legs went faster and faster.")
  if ending < 0.4:  # kindness over winning
    t.n("Then {friend} tripped on a [rock|root|stick] and fell down.", "Suddenly, {friend} fell and hurt {friend.his} knee.")
    t.say("friend", "Ow! My knee!", "Ouch!", mood="sad")
    t.n("{hero} could win the race now. But {he} stopped.", "{hero} looked at {goal}. Then {he} looked at {friend}.")
    t.n("{he} turned around and helped {friend} get up.", "{hero} went back and held out {his} hand to {friend}.")
    t.say("hero", "Are you okay? Let's finish together.", "Come on, lean on me.", mood="kind")
    t.n("They walked to {goal} together, last of all.", "Slowly, the two friends crossed the finish line together.")
    t.n("But everyone clapped and cheered for them.", "All the other children cheered, louder than for the winner.")
    t.say("friend", "Thank you, {hero}. You're the best friend ever.", "You could have won!", mood="happy")
    t.say("hero", "Helping you was better than winning.", "I would rather have a friend than a prize.", mood="happy")
    t.lesson("kindness")
    t.end("knew that being kind was better than being first", "and {friend} ran every race together")
  elif ending < 0.66:  # losing well
    t.n("But {friend} was even faster. {friend} reached {goal} first.", "In the end, {friend} won by a nose.")
    t.n("{hero} was sad. {he} had wanted to win so much.", "{hero} felt a hot, cross feeling in {his} tummy.")
    t.n("Then {he} saw how happy {friend} was.", "Then {he} remembered that {friend} was {his} friend.")
    t.say("hero", "Good race, {friend}! You were really fast.", "Well done, {friend}!", mood="kind")
    t.say("friend", "Thanks! You were fast too. Let's race again tomorrow!", "Thank you! That was fun.", mood="happy")
    t.n("{hero} smiled. Racing with a friend was fun, even without winning.",
        "They laughed and walked home together.")
    t.lesson(t.pick(("friendship", "trying")))
    t.end("was a good sport", "enjoyed every race, win or lose")
  else:  # practice paid off
    t.n("{hero} passed one runner, then another.", "All that practice helped. {hero} did not get tired.")
    t.n("{hero} reached {goal} first! {he} won!", "At the very end, {hero} ran past {friend} and won!")
    t.say("hero", "I did it! All that practice worked!", "I won!", mood="excited")
    t.n("{hero} shook {friend}'s hand.", "{friend} gave {hero} a high five.")
    t.say("friend", "Great race! Can you teach me to run that fast?", "You were so fast!", mood="happy")
    t.lesson("trying")
    t.end("practiced every day", "helped {friend} practice too")


def _lost_pet(t: _Tale) -> None:
  """The pet runs off; the family searches and asks around; the pet is found."""
  pet = t.who["pet"]
  t.c.update({"lost": pet.name, "lost.it": pet.he, "lost.n": pet.name})
  t.intro()
  t.n("{hero} had a {pet.kind} named {pet}.", "{hero}'s best friend was {pet}, a [little|fluffy|funny] {pet.kind}.",
      "{hero} loved {pet}, {his} {pet.kind}, more than anything.")
  t.n("Every day, {hero} and {pet} played together.", "{pet} followed {hero} everywhere.",
      "{pet} was [small|playful|cheeky] and always ready for fun.")
  t.para()
  t.n("{when}, someone left the garden gate open.", "{when}, {pet} saw a squirrel and ran after it.",
      "{when}, there was a loud noise outside, and {pet} ran away to hide.")
  t.n("When {hero} went to feed {pet}, {pet.he} was gone!", "Later, {hero} called for {pet}, but {pet.he} did not come.",
      "When {hero} looked around, {pet} was nowhere to be seen.")
  t.say("hero", "{pet}! Where are you?", "{adult.call}! {pet} is gone!", "Oh no! {pet} ran away!", mood="scared")
  t.n("{hero} felt [scared|worried|sick] inside. What if {pet} could not find the way home?",
      "{hero}'s heart was pounding.")
  t.cast("helper", t.who["adult"])
  t.say("adult", "Don't worry, we will find {pet.him}. Let's look together.",
        "Let's stay calm and look everywhere.", mood="kind")
  t.search(HOME_SPOTS[:6] + PLACES["garden"][1], 2)
  title, pronoun = t.pick((("Mr.", "he"), ("Mrs.", "she"), ("Miss", "she")))
  t.cast("neighbor", _Who(f"{title} {t.pick(SURNAMES)}", pronoun))
  if t.chance(0.6):
    t.n("Then they asked {neighbor} next door.", "They knocked on {neighbor}'s door.")
    t.say("hero", "Have you seen my {pet.kind}? {pet.his} name is {pet}.",
          "Have you seen {pet}? {pet.he} is a little {pet.kind}.")
    t.n("{neighbor} shook {neighbor.his} head.",
        "{neighbor} had not seen {pet}, but {neighbor.he} said {neighbor.he} would keep an eye out.")
  if t.chance(0.4):
    t.n("{hero} drew a picture of {pet} and made signs that said LOST PET.",
        "{hero} and {adult} made signs with {pet}'s picture and hung them [on trees|on the fence|all down the street].")
  t.para()
  t.n("The sun was going down. {hero} was about to give up.", "They looked and looked. It was getting late.")
  t.c["found"] = t.fill(t.pick((
    "under the porch, fast asleep", "in the garden shed, sitting in a flower pot",
    "high up in the old apple tree", "in the park, playing with some children",
    "at the back door, waiting to come in", "in {neighbor}'s garden, sniffing the roses",
    "hiding in a pile of leaves", "in the laundry basket, all along")))
  t.n("Then {hero} heard a little sound. It was {pet}! {pet.he} was {found}.",
      "Just then, {hero} spotted something. There was {pet}, {found}!",
      "At last they found {pet}. {pet.he} was {found}.")
  t.n("{pet} {pet.sound} and ran to {hero}.", "{hero} scooped {pet} up and hugged {pet.him} tight.")
  t.say("hero", "{pet}! I missed you so much!", "Never run away again, {pet}!", mood="happy")
  t.n("That night, {pet} slept right next to {hero}'s bed.", "{hero} gave {pet} an extra treat for dinner.",
      "{hero} and {adult} made sure the gate was always closed.")
  t.lesson(t.pick(("careful", "helping")))
  t.end("always checked that the gate was closed", "never let {pet} out of {his} sight",
        "and {pet} were never apart")


# Skills to learn: (skill, who can: "child"/"any", how it goes wrong, the tip, success).
SKILLS = (
  ("ride a bike", "child", "{he} wobbled and fell over [onto the grass|with a bump]",
   "Look ahead, not down, and keep pedaling.", "{hero} pedaled and pedaled, and the bike went straight down the path"),
  ("tie {his} shoes", "child", "the laces got all tangled up in a knot",
   "Make two bunny ears, cross them, and pull.", "{hero} made two bunny ears, crossed them and pulled. A bow!"),
  ("swim", "child", "{he} sank and got water up {his} nose",
   "Kick your legs and pull with your arms, like a frog.", "{hero} kicked and paddled, and {he} was swimming"),
  ("whistle", "any", "only air came out, with no sound at all",
   "Make your lips small and round, and blow very softly.", "{hero} blew softly, and out came a real whistle"),
  ("jump rope", "child", "the rope got caught on {his} feet",
   "Turn the rope first, then jump when it comes to your toes.", "{hero} jumped once, twice, ten times without stopping"),
  ("write {his} name", "child", "the letters came out big and wobbly",
   "Go slowly, one letter at a time.", "{hero} wrote all the letters of {his} name, neat and clear"),
  ("read a book all by {self}", "child", "the words were long and hard",
   "Sound out each letter, and then put the sounds together.", "{hero} read the whole page, word by word"),
  ("skip stones on the water", "any", "the stone went plop and sank",
   "Find a flat stone and throw it low and fast.", "the stone bounced one, two, three times across the water"),
  ("catch a ball", "any", "the ball bounced right off {his} hands",
   "Watch the ball all the way and make a basket with your hands.", "{hero} caught the ball"),
  ("climb a tree", "any", "{he} slipped and slid back down",
   "Hold on tight and only move one hand or foot at a time.", "{hero} climbed up to the first big branch"),
  ("fly a kite", "child", "the kite crashed onto the grass",
   "Run into the wind and let the string out slowly.", "the kite rose up and danced high in the sky"),
  ("do a cartwheel", "child", "{he} fell over in a heap",
   "Hands down, then kick your legs up high, one after the other.", "{hero} went over in a perfect cartwheel"),
  ("hop really far", "any", "{he} only hopped a tiny bit and fell on {his} nose",
   "Bend your knees low, then push up and out.", "{hero} hopped all the way over the puddle"),
  ("play the recorder", "child", "it only squeaked like a mouse",
   "Cover the holes all the way and blow very gently.", "{hero} played a whole little song"),
)


def _learn_skill(t: _Tale) -> None:
  """Trying to learn a skill, failing, a tip, practice, success."""
  skills = [s for s in SKILLS if s[1] == "any" or not t.animal]
  skill, _, oops, tip, success = t.pick(skills)
  t.c.update(skill=t.fill(skill), oops=t.fill(oops), tip=tip, success=t.fill(success))
  t.intro()
  t.n("{hero} wanted to learn to {skill}.", "More than anything, {hero} wanted to {skill}.",
      "{hero} could not {skill} yet, and {he} really wanted to.")
  t.n("{friend.intro} could already {skill}, and it looked like so much fun.",
      "All the big kids could {skill}.", "{he} had watched {adult} {skill} many times.")
  t.n("{when}, {hero} decided to try.", "{when}, {hero} said, \"Today I will learn to {skill}!\"")
  t.n("{he} tried, but {oops}.", "On the first try, {oops}.", "{hero} tried hard, but {oops}.")
  if t.chance(0.6):
    t.n("{he} tried again, and again {oops}.", "{he} tried one more time. Again, {oops}.")
  t.say("hero", "I can't do it!", "I will never learn to {skill}!", "This is too hard!", mood="cross")
  t.n("{hero} sat down. {he} felt like giving up.", "{hero}'s eyes stung with tears.",
      "{hero} was cross and tired.")
  helper = t.pick(("adult", "friend"))
  t.cast("helper", t.who[helper])
  t.n("{helper.first} came and sat beside {him}.", "Then {helper.first} came over.")
  t.say("helper", "Everyone falls at first. Let me show you a trick. {tip}",
        "Don't give up. Here is a trick: {tip}", "I couldn't do it either at first. {tip}", mood="kind")
  t.para()
  t.n("{hero} tried again. [It was still hard, but a little better.|This time, it was a bit easier.]",
      "{hero} listened and tried again.")
  if t.chance(0.6):
    t.n("{hero} practiced [every day|all week|every afternoon].",
        "{hero} kept practicing, again and again, even when it was hard.")
  t.n("And then, at last, {success}!", "Then one day, {success}!", "Finally, {success}!")
  t.say("hero", "I did it! I can {skill}!", "Look! I can do it!", mood="excited")
  t.say("helper", "I knew you could do it!", "I'm so proud of you, {hero}!", mood="happy")
  t.lesson(t.pick(("trying", "patience")))
  t.end("loved to {skill}", "showed everyone how to {skill}", "never gave up on hard things")


# Who the party is for: (role name in the story, why).
PARTY_FOR = (
  ("adult", "it was {adult}'s birthday"),
  ("friend", "it was {friend}'s birthday"),
  ("adult", "{adult} had worked hard all week"),
  ("friend", "{friend} was moving to a new house soon"),
)


def _surprise_party(t: _Tale) -> None:
  """Planning a surprise party in secret; a hitch; the surprise."""
  role, why = t.pick(PARTY_FOR)
  t.cast("guest", t.who[role])
  t.c["why"] = t.fill(why)
  t.cast("helper", t.who["friend" if role == "adult" else "adult"])
  t.intro()
  t.n("{when}, {hero} had a big secret.", "{when}, {hero} had a wonderful idea.")
  t.n("{hero} wanted to have a surprise party for {guest}, because {why}.",
      "{he} wanted to make a surprise party for {guest}, because {why}.")
  t.say("hero", "Let's have a surprise party! But {guest} must not know.", "Shh! It's a secret!",
        "We need balloons, a cake and a big card!", mood="excited")
  t.n("{hero} told {helper.first} the plan. {helper} said {helper.he} would help.",
      "{hero} told {helper.first} about the plan. {helper} loved the idea.")
  t.para()
  jobs = t.rng.sample((
    "They blew up [red|blue|yellow|rainbow] balloons.",
    "They made a big card that said HAPPY DAY with lots of hearts.",
    "They baked a [chocolate|strawberry|lemon|carrot] cake with [pink|white|yellow] icing.",
    "They hung paper stars and streamers all over the room.",
    "They made paper hats for everyone.",
    "They invited [everyone on the street|all of {guest}'s friends|the whole family].",
  ), 3)
  for job in jobs:
    t.n(job)
  hitch = t.rng.random()
  if hitch < 0.35:
    t.n("Then, oh no! The cake slipped and fell on the floor.", "But then {pet} jumped up and took a big bite of the cake!"
        if not t.animal else "Then, oh no! The cake slipped and fell on the floor.")
    t.n("They had no time to bake a new one, so they made a tower of cookies instead.",
        "They put fruit on plates and made a funny face out of strawberries instead.")
  if hitch > 0.7:
    t.n("Then they heard footsteps. {guest} was coming early!", "Suddenly, they heard the gate. {guest} was early!")
    t.n("Quick! Everyone ran and hid [behind the sofa|behind the curtains|under the table].")
  else:
    t.n("When it was time, everyone hid [behind the sofa|behind the curtains|under the table] and turned off the lights.",
        "Then everyone hid and waited quietly. Shh!")
  t.para()
  t.n("At last, {guest} came in.", "Then the door opened, and in walked {guest}.")
  t.n("Everyone jumped out and shouted, \"Surprise!\"", "\"Surprise!\" everyone shouted.")
  t.n("{guest} was so surprised that {guest.he} [jumped|laughed|almost dropped {guest.his} bag].",
      "{guest}'s mouth fell open.")
  t.say("guest", "Is this all for me?", "What a wonderful surprise! Thank you!", "You did all this for me?",
        mood="happy")
  t.n("They ate cake, sang songs and played games [all afternoon|until the stars came out].",
      "There was music, laughing and dancing.", "Everyone had a wonderful time.")
  t.n("{guest} gave {hero} the biggest hug.", "{guest} said it was the best surprise ever.")
  t.lesson("kindness")
  t.end("loved making surprises for the people {he} loved", "was great at keeping happy secrets")


# Seeds: (seed, what grows, what it gives at the end).
PLANTS = (
  ("sunflower seed", "sunflower", "a tall yellow sunflower, even taller than {hero}"),
  ("bean", "bean plant", "long green beans hanging from the vine"),
  ("pumpkin seed", "pumpkin vine", "a big, round, orange pumpkin"),
  ("tomato seed", "tomato plant", "shiny red tomatoes"),
  ("strawberry seed", "strawberry plant", "sweet red strawberries"),
  ("flower seed", "flower", "a beautiful [pink|purple|blue|red] flower"),
  ("pea", "pea plant", "fat green pea pods"),
  ("carrot seed", "carrot", "a long orange carrot, pulled right out of the ground"),
  ("acorn", "little oak tree", "a little oak tree with bright green leaves"),
  ("melon seed", "melon vine", "a round, juicy melon"),
)


def _seed(t: _Tale) -> None:
  """Planting a seed and waiting: patience."""
  seed, plant, harvest = t.pick(PLANTS)
  t.c.update(seed=seed, plant=plant, harvest=t.fill(harvest))
  t.season("spring")
  t.intro()
  t.n("{when}, {adult} gave {hero} a tiny {seed}.", "{when}, {hero} found a little {seed} in {his} pocket.",
      "{when}, {hero} got a [small paper bag|little packet] with a {seed} in it.")
  t.say("adult", "If you plant it and take care of it, it will grow into a {plant}.",
        "Plant it, give it water, and wait. You will see something wonderful.")
  t.n("{hero} dug a little hole [in the garden|in a pot by the window|next to {his} {hero.home}].",
      "{hero} found a sunny spot and dug a small hole with {his} [hands|little spade].")
  t.n("{he} put the {seed} in the hole, covered it with soil and gave it some water.",
      "{he} dropped the {seed} in, patted the soil on top and watered it [gently|carefully].")
  t.para()
  t.n("The next morning, {hero} ran to look. But there was nothing, only dirt.",
      "The next day, {hero} checked. Nothing had happened.")
  t.say("hero", "Why isn't it growing?", "When will it grow?", "Is it ever going to grow?", mood="sad")
  t.say("adult", "Seeds need time, water and sun. You must be patient.",
        "Good things take time. Keep watering it, and wait.", mood="kind")
  t.n("So {hero} waited. Every day, {he} gave the {seed} a little water.",
      "{hero} watered the spot every morning and every evening.",
      "Days went by. {hero} kept watering and waiting.")
  if t.chance(0.5):
    t.n(*(
      "One day, a hungry bird tried to dig up the seed. {hero} waved {his} arms and shooed it away.",
      "Then came some very hot days. The soil was dry, so {hero} brought extra water.",
      "One night there was a storm. In the morning, {hero} ran out to check, and the soil was still there.",
      "A snail came creeping toward the spot, so {hero} gently moved it to the grass.",
    ))
  t.n("Then one morning, {hero} saw something green. A tiny sprout was poking out of the ground!",
      "At last, a little green shoot came up, with two tiny leaves.")
  t.say("hero", "It's growing! {adult.call}, come and see!", "Look! It's a baby {plant}!", mood="excited")
  t.n("The {plant} grew and grew. [Every week it was bigger.|It grew taller every day.]",
      "All [spring|summer] long, the {plant} grew bigger and stronger.")
  t.n("And at the end of the summer, {hero} saw {harvest}!", "Then one day, {hero} found {harvest}!",
      "Soon {hero} could see {harvest}.")
  if t.chance(0.5):
    t.n("{hero} showed it to {his} [family|friends|neighbors], and everyone was happy.",
        "{hero} showed it to {friend.intro}, who said it was the best thing {friend.he} had ever seen.")
  t.lesson("patience")
  t.end("loved to plant seeds", "had {his} own little garden", "took care of {his} {plant} every day")


# Broken things: (toy, how it broke, what is wrong, the fixer's tool, how it's fixed).
BREAKS = (
  ("toy car", "fell down the stairs", "one of the wheels had come off", "some glue",
   "glued the wheel back on and held it tight until it dried"),
  ("teddy bear", "got caught on a nail", "its arm was torn", "a needle and thread",
   "sewed the arm back on with small, careful stitches"),
  ("kite", "got stuck in a tree", "it had a big hole in it", "tape and some paper",
   "patched the hole with paper and tape"),
  ("robot", "stopped working", "it did not beep or move anymore", "new batteries",
   "opened the back and put in new batteries"),
  ("doll", "was dropped in the mud", "the doll's dress was dirty and torn", "soap and a needle and thread",
   "washed the dress and sewed up the tear"),
  ("toy boat", "hit a rock", "it had a crack and let water in", "some glue",
   "filled the crack with glue and let it dry in the sun"),
  ("music box", "fell off the shelf", "it did not play its song anymore", "a tiny screwdriver",
   "opened it up and put a little spring back in place"),
  ("bike", "hit a bump", "the chain had come off", "a rag and some oil",
   "put the chain back on the wheel and oiled it"),
  ("wooden train", "was stepped on", "one of the cars was broken in two", "wood glue",
   "glued the pieces together and wrapped them with string while it dried"),
  ("birdhouse", "fell in the wind", "the roof had come off", "a hammer and nails",
   "nailed the roof back on, tap, tap, tap"),
)


def _fix_broken(t: _Tale) -> None:
  """Something loved breaks; it gets fixed with help and patience."""
  thing, how, wrong, tool, fix = t.pick(BREAKS)
  t.c.update(thing=thing, how=how, wrong=wrong, tool=tool, fix=fix, color=t.pick(COLORS))
  t.intro()
  t.n("{hero} had a {color} {thing}. It was {his} favorite.", "{hero}'s favorite thing was {his} {color} {thing}.",
      "{hero} loved {his} {thing} very much.", "{hero} had a {thing} that {he} played with every day.")
  t.n("{when}, {hero} was playing with it when it {how}.", "{when}, {his} {thing} {how}.",
      "{when}, something bad happened. The {thing} {how}.")
  t.n("{hero} picked it up. Oh no! {wrong}.", "When {hero} looked at it, {wrong}.",
      "{hero} gasped. {wrong}.")
  t.say("hero", "My {thing} is broken!", "It's ruined! It will never be the same!", "Oh no, no, no!", mood="sad")
  t.n("{hero} began to cry.", "Big tears rolled down {hero}'s cheeks.", "{hero} held the {thing} and sniffed.")
  helper = "adult" if t.chance(0.7) else "friend"
  t.cast("helper", t.who[helper])
  t.n("{helper.first} came to see what was wrong.", "{helper.first} heard {hero} crying and came over.")
  t.say("helper", "Let me see. I think we can fix it.", "Don't cry. Broken things can often be fixed.",
        "Let's see what we can do.", mood="kind")
  t.n("{helper} got {tool}.", "{helper} went to get {tool}.", "They found {tool}.")
  t.n("Then {helper} {fix}.", "{helper} showed {hero} how to help. Together they {fix}.",
      "{helper} {fix}, and {hero} helped.")
  if t.chance(0.5):
    t.say("hero", "Is it done yet?", "Can I play with it now?")
    t.say("helper", "Not yet. We have to wait a little.", "We need to be patient and let it [dry|rest] first.")
    t.n("So they waited. {hero} counted to a hundred, twice.", "They had a snack while they waited.")
  t.para()
  t.n("At last, the {thing} was fixed!", "Soon the {thing} was as good as new.",
      "Then it was done. The {thing} looked almost like new.")
  if t.chance(0.4):
    t.n("It had a little mark where it had been broken, but {hero} did not mind.",
        "You could still see where it had been fixed. {hero} said that made it even more special.")
  t.say("hero", "Thank you, {helper.call}! You fixed it!", "It works! Thank you so much!", mood="happy")
  t.n("{hero} hugged {helper}.", "{hero} gave {helper} a big hug and ran off to play.")
  t.lesson(t.pick(("care", "patience", "helping")))
  t.end("took good care of {his} {thing}", "helped fix things when they broke",
        "was very careful with {his} {thing}")


# Getting lost: (where, what the hero follows, a landmark that helps).
LOST_WAYS = (
  ("forest", "a pretty butterfly", "the big rock shaped like a bear"),
  ("park", "a runaway balloon", "the tall fountain"),
  ("meadow", "a little rabbit", "the old windmill"),
  ("beach", "a crab running sideways", "the red and white lighthouse"),
  ("farm", "a little lamb", "the big red barn"),
  ("forest", "a trail of pretty stones", "the stream that ran past home"),
  ("zoo", "a peacock with a long tail", "the big map by the gate"),
  ("hill", "a rolling ball", "the smoke from {his} own chimney"),
)


def _lost_way(t: _Tale) -> None:
  """Wandering off, getting lost, staying calm, finding the way back."""
  ways = [w for w in LOST_WAYS if not t.animal or w[0] in ANIMAL_PLACES]
  place, follow, landmark = t.pick(ways)
  t.setting((place,))
  t.c.update(follow=follow, landmark=t.fill(landmark))
  t.cast("helper", t.who["adult"])
  t.intro()
  t.n("{when}, {hero} and {adult} went {place.to}.", "{when}, {adult} took {hero} {place.to}.")
  t.say("adult", "Stay close to me, {hero}.", "Don't wander off, okay?", "Stay where I can see you.")
  t.scene(0.6)
  t.n("Then {hero} saw {follow}.", "Suddenly, {hero} spotted {follow}.")
  t.n("{he} followed it, farther and farther.", "{hero} {ran} after it, without looking back.",
      "{he} wanted to see where it was going, so {he} followed it.")
  t.para()
  t.n("When {he} stopped, {he} looked around. {adult} was nowhere to be seen.",
      "After a while, {hero} looked up. Nothing looked familiar.",
      "Then {hero} stopped. Where was {adult}?")
  t.say("hero", "{adult.call}? Where are you?", "Oh no! I'm lost!", "Which way is home?", mood="scared")
  t.n("{hero}'s heart beat fast. {he} felt very small and alone.", "{hero} wanted to cry.",
      "Everything looked big and strange.")
  way = t.rng.random()
  if way < 0.35:
    t.n("Then {hero} remembered what {adult} always said: if you are lost, stay in one place.",
        "Then {hero} remembered {adult}'s words: stand still, and someone will find you.")
    t.n("So {hero} sat down and waited, and called out loud.", "{hero} stood still and called {adult}'s name.")
    t.n("Soon {he} heard a voice. \"{hero}! {hero}!\" It was {adult}!",
        "After a little while, {adult} came hurrying along the path.")
  elif way < 0.7:
    t.stranger()
    t.n("Then {hero} saw {stranger.first}.", "Just then, {stranger.first} came by.")
    t.say("hero", "Excuse me. I'm lost. Can you help me find {adult.call}?", "Please help me. I can't find my family.")
    t.say("stranger", "Of course. Let's find your family together.", "Don't worry. We will find them.",
          mood="kind")
    t.n("{stranger} took {hero} back along the path. There was {adult}, looking everywhere!",
        "Together they walked until they found {adult}.")
  else:
    t.n("Then {hero} saw {landmark} in the distance.", "Then {hero} spotted {landmark}.")
    t.n("{he} knew that place! {he} walked toward it, step by step.", "{he} remembered passing it, and {he} followed the path back.")
    t.n("And there was {adult}, calling {his} name!", "Soon {he} saw {adult}, looking for {him}.")
  t.n("{hero} ran into {adult}'s arms.", "{adult} hugged {hero} tight.")
  t.say("adult", "I was so worried! I'm glad you're safe.", "There you are! You must stay close to me.",
        mood="kind")
  t.say("hero", "I'm sorry. I will stay close next time.", "I'm sorry, {adult.call}. I followed {follow}.",
        mood="sad")
  t.lesson(t.pick(("calm", "careful")))
  t.end("always stayed close to {adult}", "never wandered off again", "remembered what to do if {he} got lost")


def _new_friend(t: _Tale) -> None:
  """A newcomer; one shy hello; a shared love; a new best friend."""
  t.c["likes"] = t.fill(t.pick((
    "dinosaurs", "drawing", "the color {color}", "climbing", "singing", "stories about dragons",
    "frogs", "ice cream", "puzzles", "building towers", "the moon and the stars", "soccer")))
  shy_hero = t.chance(0.4)
  t.intro(traits=("shy", "quiet", "gentle") if shy_hero else TRAITS)
  if t.animal:
    t.n("{when}, a new family moved into the [forest|meadow] near {hero}'s {hero.home}.",
        "{when}, {hero} saw a new {friend.kind} in the meadow.")
    t.n("It was a little {friend.kind} named {friend}.", "The new {friend.kind} was called {friend}.")
  else:
    t.setting(("school", "park", "playground"))
    t.n("{when}, a new {friend.kind} came to {hero}'s class. {friend.his} name was {friend}.",
        "{when}, a new family moved in next door. They had a {friend.kind} named {friend}.",
        "{when}, there was a new {friend.kind} {place.at}. {friend.his} name was {friend}.")
  t.n("{friend} stood all alone. {friend.he} looked shy.", "{friend} did not know anyone. {friend.he} sat by {friend.self}.",
      "{friend} looked at the ground and did not talk to anyone.")
  if shy_hero:
    t.n("{hero} was shy too. {he} wanted to say hello, but {his} words got stuck.",
        "{hero} wanted to say hi, but {he} felt shy.")
    t.n("{adult} smiled at {him}. \"Just say hello,\" {adult.he} said. \"That's all it takes.\"",
        "{hero} remembered what {adult} had said: one small hello is all it takes.")
  t.n("{hero} took a deep breath and walked over.", "So {hero} walked over to {friend}.")
  t.say("hero", "Hi! I'm {hero}. Do you want to play?", "Hello! My name is {hero}. What's yours?",
        "Hi! Do you want to play with me?")
  t.say("friend", "I'm {friend}. Yes, please!", "Okay! I'm {friend}.", "Really? I'd like that!", mood="happy")
  t.n("They started to talk. They both liked {likes}!", "Soon they found out they both loved {likes}.")
  t.say("hero", "You like {likes} too?", "I love {likes}!", mood="excited")
  t.n("They played all [day|afternoon] long.", "They [laughed|talked] and played until it was time to go home.",
      "They played together and told each other jokes.")
  if t.chance(0.4):
    t.n("Then {friend} shared {friend.his} {food} with {hero}.", "{hero} showed {friend} {his} favorite hiding place.")
  t.n("By the end of the day, {hero} and {friend} were [good|best] friends.",
      "{friend} was not shy anymore, and neither was {hero}.")
  t.lesson("new friends")
  t.end("and {friend} played together every day", "always said hello to new friends")


# Mistakes to own up to: (the accident, what it leaves, how to make it right). {you}, {your}
# and {me} are "her mom", "her mom's" and "her" in narration, "you", "your", "me" in speech.
MISTAKES = (
  ("broke {your} favorite blue cup", "pieces of the cup lay on the floor", "glued the big pieces and planted a little flower in it"),
  ("ate the cookies that were for the party", "only crumbs were left on the plate", "baked a new batch of cookies together"),
  ("spilled red paint on the white rug", "there was a big red spot on the rug", "scrubbed the rug with soap and water"),
  ("lost the book {you} had lent {me}", "the book was gone", "counted {his} coins together and bought a new book"),
  ("drew on the wall with a crayon", "there was a big crayon drawing on the wall", "washed the wall with a sponge"),
  ("knocked over the flower vase", "water and flowers were all over the table", "cleaned up and picked new flowers"),
  ("stepped on the flowers in {your} garden", "the flowers were broken and flat", "planted new flowers together"),
  ("broke the window with {his} ball", "there was a crack in the window", "helped pay for a new window with {his} coins"),
)


def _truth(t: _Tale) -> None:
  """An accident, the urge to hide it, a heavy heart, the truth, forgiveness."""
  did, left, amends = t.pick(MISTAKES)
  t.c.update({"you": t.c["adult"], "your": t.c["adult"] + "'s", "me": t.c["him"]})
  t.c.update(did=t.fill(did), left=t.fill(left), amends=t.fill(amends))
  t.c.update(you="you", your="your", me="me")
  t.c["did.said"] = t.fill(did)
  t.intro()
  t.n("{when}, {hero} was playing inside when {he} {did}.", "{when}, {hero} {did}. It was an accident.",
      "{when}, {hero} was not being careful, and {he} {did}.")
  t.n("Oh no! {left}.", "{hero} looked, and {left}.")
  t.n("{hero} was scared. What would {adult} say?", "{hero} felt [hot|cold] all over. {he} did not want to get in trouble.")
  t.n("{he} ran to {his} room and hid under the blanket.",
      "{he} did not tell anyone. {he} went outside and pretended nothing had happened.")
  t.para()
  t.n("Later, {adult} asked, \"Does anyone know what happened?\"",
      "Later, {adult} looked at {hero} and asked, \"Is something wrong?\"")
  if t.chance(0.4):
    t.say("hero", "I don't know.", "Maybe it was {pet}?", "It wasn't me.", mood="scared")
    t.n("But then {hero} felt a heavy feeling in {his} tummy.", "But the words made {hero} feel bad inside.")
  t.n("{hero} could not stop thinking about it.", "{hero}'s heart felt heavy, like a big stone.",
      "{hero} could not eat {his} dinner. {he} felt too bad.")
  t.n("At last, {hero} went to {adult}.", "{hero} took a deep breath and walked to {adult}.")
  t.say("hero", "{adult.call}, it was me. I {did.said}. I'm sorry.",
        "I have to tell you something. I {did.said}. I'm so sorry.",
        mood="sad")
  t.n("{adult} was quiet for a moment. Then {adult.he} gave {hero} a hug.",
      "{adult} looked at {hero}, and then {adult.he} smiled a little.")
  t.say("adult", "Thank you for telling me the truth. That was very brave.",
        "I'm not angry. Everyone makes mistakes. I'm proud of you for being honest.", mood="kind")
  t.n("Then they {amends}.", "Together, they {amends}.")
  t.n("{hero}'s heart felt light again.", "{hero} felt much better.", "The heavy feeling was gone.")
  t.lesson("honesty")
  t.end("always told the truth", "was honest, even when it was hard")


# Animals in trouble: (the animal, its trouble, what the hero does, how it ends).
TROUBLES = (
  ("a little bird", "it had a hurt wing and could not fly",
   "put it gently in a box with a soft towel and gave it some water",
   "After a few days, the wing was better, and the bird flew up into the sky"),
  ("a kitten", "it was stuck high up in a tree, crying meow",
   "called a grown-up with a ladder, and held the ladder steady",
   "The kitten was soon safe on the ground, purring"),
  ("a baby duck", "it had lost its mother and was peeping loudly",
   "walked slowly, showing the duckling the way to the pond",
   "The mother duck quacked, and the duckling swam to her"),
  ("a turtle", "it was stuck on its back and could not turn over",
   "gently turned it the right way up",
   "The turtle blinked, stretched its neck and slowly walked away"),
  ("a puppy", "its paw was stuck in a fence",
   "gently pushed the boards apart and freed its paw",
   "The puppy licked {hero}'s hand and wagged its tail"),
  ("a butterfly", "it was caught in a spider web",
   "carefully pulled the sticky web off its wings",
   "The butterfly fluttered away, bright and free"),
  ("a little fish", "it was stuck in a small puddle, far from the pond",
   "scooped it up in a cup with water and carried it to the pond",
   "The fish flicked its tail and swam away"),
  ("a hedgehog", "it had fallen into a hole and could not climb out",
   "laid a long stick in the hole like a ramp",
   "The hedgehog climbed up the stick and waddled off into the bushes"),
)


def _help_animal(t: _Tale) -> None:
  """Finding an animal in trouble, helping it carefully, letting it go."""
  animal, trouble, help_, ends = t.pick(TROUBLES)
  t.c.update(animal=animal, trouble=trouble, help=t.fill(help_), ends=t.fill(ends))
  t.setting(("park", "garden", "forest", "meadow", "pond"))
  t.intro()
  t.n("{when}, {hero} was walking {place.at}.", "{when}, {hero} and {friend} were playing {place.at}.")
  t.scene(0.4)
  t.n("Then {hero} saw something [move|wiggle] [in the grass|by the path|nearby].", "Suddenly, {hero} saw something move.")
  t.n("It was {animal}. {trouble}.", "There was {animal}, and {trouble}.")
  t.say("hero", "Oh, poor thing!", "Don't worry, little one. I will help you.", mood="kind")
  if t.chance(0.6):
    t.n("{hero} was not sure what to do, so {he} [called|ran to get] {adult}.", "{hero} asked {adult} for help.")
    t.say("adult", "We must be very gentle and calm.", "Good job for asking. Let's help it together.", mood="kind")
  t.n("{hero} {help}.", "Slowly, {hero} {help}.", "{hero} was very gentle. {he} {help}.")
  t.n("{ends}.", "At last, it worked! {ends}.")
  t.say("hero", "Goodbye! Be safe!", "Bye-bye, little friend!", mood="happy")
  t.n("{hero} felt warm and happy inside.", "{hero} smiled all the way home.",
      "{hero} was proud that {he} had helped.")
  t.lesson(t.pick(("kindness", "helping")))
  t.end("was always kind to animals", "looked out for animals who needed help")


# Baking: (dish, special ingredient, what goes wrong, how it is saved, how it is cooked).
BAKES = (
  ("cookies", "chocolate chips", "{hero} poured in way too much flour, and a white cloud puffed up everywhere",
   "They laughed, swept up the flour and measured again, slowly this time", "put the tray in the oven"),
  ("cake", "strawberries", "{hero} dropped an egg on the floor. Splat!",
   "They cleaned it up, and {adult} let {hero} crack the next egg very carefully", "put the cake in the oven"),
  ("pancakes", "blueberries", "the first pancake came out flat and burnt",
   "{adult} said the first pancake is always for practice, and the next ones were perfect",
   "cooked the pancakes in a hot pan, one by one"),
  ("bread", "honey", "the dough would not rise at first",
   "They put it in a warm spot and waited, and slowly it puffed up big and round", "put the bread in the oven"),
  ("muffins", "bananas", "{hero} used salt instead of sugar by mistake",
   "They tasted a little bit, made funny faces, and started again with sugar", "put the muffins in the oven"),
  ("pie", "apples", "the pie crust tore when {hero} lifted it",
   "They pressed the pieces together like a puzzle, and nobody could tell", "put the pie in the oven"),
  ("pizza", "cheese", "{hero} tossed the dough up high, and it landed on {his} head",
   "Everyone laughed so hard, and they made a new ball of dough", "put the pizza in the hot oven"),
)


def _baking(t: _Tale) -> None:
  """Baking with a grown-up; a messy mistake; patience; sharing the treat."""
  dish, extra, oops, saved, cook = t.pick(BAKES)
  plural = dish.endswith("s")
  t.c.update(it="them" if plural else "it", cook=t.fill(cook))
  t.c.update({"dish": dish, "a.dish": dish if plural or dish in ("bread", "pizza") else "a " + dish,
              "dish.was": "were" if plural else "was", "extra": extra, "oops": t.fill(oops),
              "saved": t.fill(saved)})
  t.intro()
  t.n("{when}, {adult} said, \"Would you like to help me bake {a.dish}?\"",
      "{when}, {hero} and {adult} decided to bake {a.dish}.", "{when}, {hero} wanted to bake {a.dish} with {adult}.")
  t.say("hero", "Yes! Can we put {extra} in {it}?", "Oh yes! I love baking!", mood="excited")
  t.n("They put on their aprons and washed their hands.", "{adult} took out a big bowl and a wooden spoon.")
  t.n("They [measured|poured] flour and sugar into the bowl.", "{hero} helped to stir and stir.",
      "They mixed everything together, and then they added the {extra}.")
  t.n("But then {oops}.", "Then, oops! {oops}.")
  if t.chance(0.5):
    t.say("hero", "Oh no! I ruined it!", "I'm sorry! I made a mess!", mood="sad")
    t.say("adult", "That's okay. Mistakes happen in every kitchen.", "Don't worry. We can fix it.", mood="kind")
  t.n("{saved}.")
  t.n("Then {adult} {cook}.", "When everything was ready, {adult} {cook}.")
  t.n("{hero} wanted to eat {it} right away, but they had to wait.", "They waited and waited. The kitchen smelled wonderful.")
  if t.chance(0.4):
    t.say("hero", "Is it ready yet?", "How much longer?")
    t.say("adult", "Not yet. Good things take time.", "Just a few more minutes.")
  t.n("At last, the {dish} {dish.was} ready.", "Ding! The {dish} {dish.was} done.")
  t.n("The {dish} smelled so good.", "{hero} took a bite. It was delicious!", "Yum! The {dish} tasted wonderful.")
  t.n("They shared the {dish} with {friend} and [the neighbors|the whole family].",
      "{hero} took some to {friend}, who said it was the best ever.")
  t.lesson(t.pick(("patience", "sharing")))
  t.end("loved to bake with {adult}", "helped in the kitchen every week")


def _treasure_hunt(t: _Tale) -> None:
  """A map, clues, searching together, a small treasure shared."""
  t.setting(("garden", "park", "beach", "forest", "farm"))
  spots = t.rng.sample(PLACES[t.c["place"]][1], 3)
  t.c["treasure"] = t.fill(t.pick((
    "a little box full of shiny stones", "a bag of gold chocolate coins", "an old tin full of marbles",
    "a box with two toy compasses inside", "a jar of colorful buttons and a note", "a basket of {food}s")))
  t.intro()
  together = t.chance(0.4)
  if together:
    t.n("{when}, {hero} and {friend.intro} found a map in a bottle.",
        "{when}, {hero} and {friend.intro} found an old map under a loose board.")
  else:
    t.n("{when}, {hero} found an old piece of paper. It was a map!",
        "{when}, {adult} gave {hero} a rolled-up paper. It was a treasure map!")
  t.n("The map showed {place.the}, with a big X.", "On the map there was a big red X.")
  t.say("hero", "A treasure map! Let's find the treasure!", "Look! A real treasure map!", mood="excited")
  if together:
    t.n("{hero} and {friend} went {place.to} with the map.", "The two friends set off {place.to}.")
  else:
    t.n("{hero} ran to get {friend.intro}, and they set off {place.to}.",
        "{hero} showed the map to {friend.intro}, and they went {place.to} together.")
  found = t.rng.sample(("another clue", "a little note with an arrow", "a ribbon tied to a stick",
                        "a stone with an arrow painted on it"), 2)
  for i, spot in enumerate(spots):
    t.c["spot"] = spot
    if i == 0:
      t.n("First, the map led them {spot}.", "The first clue said to look {spot}.")
    elif i == 1:
      t.n("Next, they looked {spot}.", "The next clue sent them {spot}.")
    else:
      t.n("At last, they came to the big X, {spot}.", "The last clue led them {spot}.")
    if i < 2:
      t.c["clue"] = found[i]
      t.n("There they found {clue}.", "There was {clue}!")
  t.n("They looked and looked. Then they saw a box peeking out!", "They searched carefully and found something hidden!")
  t.n("It was {treasure}!", "Inside was {treasure}!")
  t.say("friend", "We found it!", "Wow! Real treasure!", mood="excited")
  t.n("{hero} and {friend} shared the treasure [equally|half and half].",
      "They split the treasure so that each of them had the same.")
  if t.chance(0.5):
    t.n("Later, {adult} smiled and winked. {adult.he} had made the map [all by {adult.self}|for them].",
        "It turned out that {adult} had hidden it there, just for them.")
  t.lesson(t.pick(("teamwork", "friendship")))
  t.end("loved treasure hunts", "and {friend} made maps for each other")


# Gifts to make: (what, how it is made).
GIFTS = (
  ("a picture", "drew a big picture with all {his} crayons, with a sun, a house and everyone in the family"),
  ("a card", "folded a paper, drew hearts on it and wrote I LOVE YOU inside"),
  ("a necklace", "put colorful beads on a string, one by one"),
  ("a painted rock", "found a smooth rock and painted a smiling face on it"),
  ("a flower crown", "picked daisies and wove them into a little crown"),
  ("a poem", "wrote a short poem, and the words rhymed"),
  ("a clay bowl", "rolled and pressed some clay into a little bowl"),
  ("a bookmark", "cut a strip of paper and colored it with stripes and stars"),
)


def _gift(t: _Tale) -> None:
  """Wanting to give a gift with no money; making one; it is loved most of all."""
  gift, made = t.pick(GIFTS)
  who = t.pick(("adult", "friend"))
  t.cast("guest", t.who[who])
  t.c.update(gift=gift, made=t.fill(made), occasion=t.fill(t.pick((
    "{guest}'s birthday", "a special day for {guest}", "the day {guest} came home from the hospital"))))
  t.intro()
  t.n("Soon it would be {occasion}.", "{when}, {hero} remembered that tomorrow was {occasion}.")
  t.n("{hero} wanted to give {guest} a present.", "{hero} wanted to give {guest} something special.")
  t.n("But {hero} had no money. {his} piggy bank had only [two|three] coins in it.",
      "But {hero} could not buy anything at the store.")
  t.say("hero", "What can I give {guest.call}?", "I don't have anything to give!", mood="sad")
  if t.chance(0.5) and who == "friend":
    t.say("adult", "The best gifts are the ones you make with love.", "Why don't you make something?", mood="kind")
  else:
    t.n("Then {hero} had an idea. {he} would make a gift!", "Then {hero} smiled. {he} could make something!")
  t.n("{hero} {made}.", "{hero} worked hard. {he} {made}.")
  if t.chance(0.4):
    t.n("It was not perfect. [Some of it was crooked.|There was a smudge on one side.]",
        "{hero} worried that it was not good enough.")
  t.para()
  t.n("The next day, {hero} gave {guest} {gift}.", "On the big day, {hero} gave {gift} to {guest}.")
  t.say("hero", "I made it for you!", "It's not much, but I made it myself.")
  t.n("{guest} looked at it for a long time.", "{guest}'s eyes shone.")
  t.say("guest", "It's beautiful! This is the best present I have ever had!",
        "You made this for me? I love it!", mood="happy")
  t.n("{guest} kept it [on the kitchen table|by {guest.his} bed|in a special place] for a long, long time.",
      "{guest} hugged {hero} tight.")
  t.lesson("giving")
  t.end("loved to make presents", "made a gift for someone every year")


# Warnings: (the warning, what the hero did anyway, the small mishap, the safe way).
WARNINGS = (
  ("Don't run by the pool, it's slippery.", "ran along the edge of the pool", "slipped and bumped {his} knee",
   "walked slowly by the pool"),
  ("Wear your helmet when you ride your bike.", "rode {his} bike without a helmet", "fell off and bumped {his} head",
   "always wore {his} helmet"),
  ("Don't climb too high on the fence.", "climbed to the very top of the fence", "got stuck and could not get down",
   "stayed on the low part of the fence"),
  ("Hold my hand when we cross the street.", "let go of {adult}'s hand", "almost stepped out in front of a bike",
   "held hands when crossing the street"),
  ("Don't touch the stove, it's hot.", "reached for the pot on the stove", "touched the hot pot and burned {his} finger a little",
   "stayed away from the hot stove"),
  ("Put your toys away, or someone might trip.", "left {his} toys on the stairs", "tripped on {his} own toy car",
   "put {his} toys away"),
  ("Don't eat berries you don't know.", "picked some strange red berries", "got a tummy ache from just one berry",
   "only ate berries that a grown-up said were safe"),
  ("Stay away from the edge of the pond.", "leaned out over the edge of the pond", "slipped and got {his} feet all wet",
   "stayed back from the edge"),
)


def _careful(t: _Tale) -> None:
  """A warning, ignored (small mishap) or heeded (trouble avoided)."""
  warn, did, mishap, safe = t.pick(WARNINGS)
  t.c.update(warn=warn, did=t.fill(did), mishap=t.fill(mishap), safe=t.fill(safe))
  t.intro()
  t.n("{when}, {hero} was very excited to play.", "{when}, {hero} was in a big hurry.",
      "{when}, {hero} had lots of energy.")
  t.say("adult", "{hero}, be careful. " + warn, warn + " Be careful, {hero}.")
  if t.chance(0.65):
    t.say("hero", "I know, I know!", "I'll be fine!", "Okay!", mood="excited")
    t.n("But {hero} forgot. {he} {did}.", "But {hero} did not listen. {he} {did}.")
    t.n("Oh no! {he} {mishap}.", "Then {he} {mishap}.")
    t.say("hero", "Oh no!", "{adult.call}!", mood="sad")
    t.n("{adult} came right away.", "{adult} rushed over and [held|hugged] {him}.")
    t.say("adult", "Are you okay? That is why we need to be careful.", "It's okay. Now you know why I said it.",
          mood="kind")
    t.n("{hero} nodded. {he} was okay, but {he} had learned {his} lesson.", "Luckily, {hero} was not badly hurt.")
    t.say("hero", "I'm sorry. I will listen next time.", "I'll be more careful.", mood="sad")
  else:
    t.n("{hero} wanted to hurry, but then {he} remembered what {adult} had said.",
        "{hero} was about to rush, but {he} stopped and thought.")
    t.n("So {hero} {safe}.", "{hero} {safe}, just like {adult} had said.")
    t.n("Nothing bad happened, and {hero} had a lovely day.", "{hero} was glad {he} had listened.")
    t.say("adult", "Good job, {hero}. You were very careful.", "I'm proud of you for listening.", mood="happy")
  t.lesson("careful")
  t.end(safe, "listened to {adult}")


# Ways to hurt a friend's feelings: (what the hero did, what it leads to).
UNKIND = (
  ("grabbed the {toy.n} right out of {friend}'s hands", "{friend} began to cry"),
  ("laughed when {friend} fell in the mud", "{friend}'s face turned red, and {friend.he} ran away"),
  ("said that {friend}'s drawing was ugly", "{friend} crumpled up the drawing and looked down"),
  ("knocked over {friend}'s tower and did not say sorry", "{friend} stamped {friend.his} foot and went home"),
  ("did not let {friend} join the game", "{friend} sat alone on the bench"),
  ("called {friend} a slowpoke", "{friend} walked away with {friend.his} head down"),
)


def _sorry(t: _Tale) -> None:
  """An unkind act; the friend is hurt; the hero feels it, says sorry and makes up."""
  t.toy()
  did, hurt = t.pick(UNKIND)
  t.c.update(did=t.fill(did), hurt=t.fill(hurt))
  t.setting(PLAY_PLACES)
  t.intro()
  t.n("{hero} and {friend} were playing {place.at}.", "{when}, {hero} and {friend} went {place.to} to play.")
  t.n("At first, they had lots of fun.", "They played [tag|catch|pretend] for a while.")
  t.n("But then {hero} got [cross|grumpy|silly] and {did}.", "Then {hero} {did}.")
  t.n("{hurt}.")
  t.n("{hero} felt a funny feeling in {his} tummy.", "At first {hero} did not care. But soon {he} felt bad.",
      "{hero} stood there alone. Playing was not fun anymore.")
  if t.chance(0.5):
    t.say("adult", "{hero}, how do you think {friend} feels now?", "What happened, {hero}?", mood="kind")
    t.say("hero", "I was mean to {friend}.", "I think I hurt {friend}'s feelings.", mood="sad")
    t.say("adult", "What do you think you should do?", "Maybe you can make it right.", mood="kind")
  t.n("{hero} knew what {he} had to do.", "{hero} thought about it, and then {he} went to find {friend}.")
  t.say("hero", "I'm sorry, {friend}. That was not nice of me.", "{friend}, I'm really sorry. Can we be friends again?",
        mood="sad")
  t.n("{friend} looked at {hero} for a moment.", "{friend} was quiet.")
  t.say("friend", "Okay. Thank you for saying sorry.", "I forgive you. Let's play again.", mood="kind")
  if t.chance(0.5):
    t.n("{hero} gave {friend} a hug.", "{hero} shared {his} {food} with {friend} to make up.")
  t.n("Soon they were laughing again.", "They played together for the rest of the day.")
  t.lesson("sorry")
  t.end("was careful with {his} words", "said sorry when {he} made a mistake")


def _snow_day(t: _Tale) -> None:
  """A snowy day: playing, getting cold, warming up together."""
  t.season("winter", "snowy")
  t.set("when", "One winter morning", "One snowy morning", "On the first snowy day")
  t.setting(("park", "garden", "hill"))
  t.intro()
  t.n("{when}, {hero} looked out of the window. Everything was white!",
      "{when}, {hero} woke up and saw snow falling outside.")
  t.say("hero", "Snow! It's snowing!", "{adult.call}, can we go outside?", mood="excited")
  t.n("{hero} put on {his} boots, {his} hat, {his} scarf and {his} [red|blue|green|striped] mittens.",
      "{adult} helped {hero} put on {his} warm coat and boots.")
  t.n("Then {hero} and {adult} went out {place.to}.", "{hero} and {adult} went {place.to} together.")
  for act in t.rng.sample((
      "{hero} made a snow angel, waving {his} arms and legs.",
      "{hero} and {adult} had a snowball fight. Splat! Right on {adult}'s hat!",
      "They rode a sled down the hill. Whoosh!",
      "{hero} caught snowflakes on {his} tongue.",
      "{hero} made a little snow bunny with two sticks for ears.",
      "{hero} followed the tracks of a bird in the snow.",
      "They built a big snowman with a carrot nose.",
  ), 2):
    t.n(act)
  if t.chance(0.5):
    t.n("Then one of {his} mittens fell off, and {his} fingers got very cold.",
        "After a while, {hero}'s nose and toes were very cold.")
    t.say("hero", "My fingers are freezing!", "Brrr! I'm cold!", mood="sad")
  t.n("So they went inside to warm up.", "Then it was time to go in and warm up.")
  t.n("{hero} sat by the warm fire with a cup of cocoa.", "{adult} made hot cocoa, warm and sweet.")
  t.say("hero", "That was the best snow day ever!", "Can we play in the snow again tomorrow?", mood="happy")
  t.end("loved snowy days", "waited every winter for the first snow")


def _bedtime(t: _Tale) -> None:
  """Not being able to sleep; a noise; comfort; sleep."""
  t.c["tod"] = "evening"
  t.intro(weather=False)
  t.n("One night, {hero} could not sleep.", "It was bedtime, but {hero} was wide awake.")
  t.n("{he} tossed and turned. {he} counted sheep, but it did not help.",
      "{he} looked at the ceiling. {his} eyes would not close.")
  if not t.animal and t.chance(0.5):
    t.n("Then {he} heard a noise. Scratch, scratch!", "Then something went thump in the dark.")
    t.say("hero", "Who is there?", "{adult.call}?", mood="scared")
    t.n("It was only {pet} the {pet.kind}, who wanted to sleep with {him}.",
        "It was just {pet}, looking for a warm place to sleep.")
  t.n("{adult} came in and sat on the bed.", "{adult} came to say good night again.")
  t.say("adult", "Can't sleep? Let's look at the moon.", "Shall I sing you a song?",
        "Let's think of all the happy things from today.", mood="kind")
  t.n(*(
    "They looked out of the window. The moon was round and bright, and the stars twinkled.",
    "{adult} sang a soft song about the sea and the stars.",
    "They talked about the best things of the day: the {food}, the games and {friend}.",
    "{adult} told a story about a sleepy little bear.",
  ))
  t.n("{hero}'s eyes began to feel heavy.", "{hero} yawned a big yawn.")
  t.say("hero", "Good night, {adult.call}.", "I love you.", mood="kind")
  t.n("Soon {hero} was fast asleep.", "In no time, {hero} was asleep, dreaming happy dreams.")
  t.end("knew what to do when {he} could not sleep", "was not afraid of sleepless nights",
        closers=("{hero} slept well all night long.", "And {hero} slept until morning, with a smile on {his} face.",
                 "Good night, {hero}."))


# Trips: (place, what to see, a small problem there, what the hero shouts).
TRIPS = (
  ("zoo", "the lions, the giraffes and the monkeys", "a monkey grabbed {hero}'s hat", "Hey! That's my hat!"),
  ("farm", "the cows, the pigs and the hens", "a goat started to nibble {hero}'s sleeve", "Stop! That's not food!"),
  ("beach", "the waves, the shells and the seagulls", "a seagull stole {hero}'s sandwich", "Hey! Come back!"),
  ("forest", "the tall trees, the mushrooms and the birds", "{hero}'s boot got stuck in the mud", "Help! I'm stuck!"),
  ("river", "the ducks, the boats and the fish", "{hero}'s hat blew into the water", "My hat! Come back!"),
)


def _trip(t: _Tale) -> None:
  """A day trip with sights, a small problem solved with a laugh, and a happy way home."""
  trips = [x for x in TRIPS if not t.animal or x[0] in ANIMAL_PLACES]
  place, see, problem, shout = t.pick(trips)
  t.setting((place,))
  t.c.update(see=see, problem=t.fill(problem))
  t.intro()
  t.n("{when}, {hero} and {adult} went {place.to}.", "{when}, {adult} took {hero} and {friend} {place.to}.")
  t.say("hero", "I want to see everything!", "Hooray! We're going {place.to}!", mood="excited")
  t.scene(0.8)
  t.n("They saw {see}.", "First they saw {see}.")
  t.n("{hero} liked the [biggest|smallest|funniest] ones best.", "{hero} wanted to look at everything.")
  t.n("But then {problem}!", "Suddenly, {problem}!")
  t.say("hero", shout, "Oh no!")
  t.n("{adult} laughed, and soon {hero} was laughing too.", "At first {hero} was cross, but then {he} started to giggle.")
  t.n("{adult} helped, and soon everything was all right again.", "It was a funny thing to tell everyone at home.")
  t.n("On the way home, {hero} was so tired that {he} fell asleep.",
      "When they got home, {hero} told {friend} all about it.")
  t.end("wanted to go {place.to} again", "loved to tell everyone about the trip")


# ----------------------------------------------------------------------------- public API

# (plot, weight, whether an animal can be the hero)
PLOTS = (
  (_lost_toy, 1.0, True), (_sharing, 1.0, True), (_fear, 1.2, True), (_cheer_up, 1.0, True),
  (_build, 1.0, True), (_rainy_day, 0.8, False), (_race, 0.9, True), (_lost_pet, 0.8, False),
  (_learn_skill, 1.0, True), (_surprise_party, 0.8, True), (_seed, 0.8, True), (_fix_broken, 0.8, False),
  (_lost_way, 0.8, True), (_new_friend, 1.0, True), (_truth, 0.8, False), (_help_animal, 0.9, True),
  (_baking, 0.7, True), (_treasure_hunt, 0.7, True), (_gift, 0.7, False), (_careful, 0.8, False),
  (_sorry, 0.8, True), (_snow_day, 0.5, False), (_bedtime, 0.5, True), (_trip, 0.6, True),
)
_CUM_WEIGHTS = tuple(itertools.accumulate(w for _, w, _ in PLOTS))
ANIMAL_HERO_SHARE = 0.2
_WHENS = (
  "One day", "One day", "One {weather} {tod}", "One {season} {tod}", "On {weekday}",
  "One {weekday} [morning|afternoon]", "One {tod}", "One {weather} day", "Early one morning",
)


def _child(rng: random.Random, avoid: set[str]) -> _Who:
  girl = rng.random() < 0.5
  names = GIRL_NAMES if girl else BOY_NAMES
  name = rng.choice(names)
  while name in avoid:
    name = rng.choice(names)
  return _Who(name, "she" if girl else "he", "girl" if girl else "boy")


def _critter(rng: random.Random, avoid: set[str], kind: str) -> _Who:
  name = rng.choice(CRITTER_NAMES)
  while name in avoid:
    name = rng.choice(CRITTER_NAMES)
  return _Who(name, rng.choice(("he", "she")), kind)


def _setup(t: _Tale, animal: bool) -> None:
  """Draws the cast, the season, weather and time; plots may override any of it."""
  rng, c = t.rng, t.c
  t.animal = animal
  if animal:
    kind, home, lives, ran = rng.choice(ANIMAL_KINDS)
    hero = _critter(rng, set(), kind)
    desc = f"{rng.choice(('little', 'little', 'small', 'young'))} {kind}"
  else:
    hero = _child(rng, set())
    home, lives, ran = "house", rng.choice(HOMETOWNS), "ran"
    desc = f"{rng.choice(('little', 'little', 'young', 'small'))} {hero.kind}"
  t.cast("hero", hero)
  c.update({"hero.desc": desc, "hero.home": home, "hero.lives": lives, "ran": ran})

  if animal:
    friend = _critter(rng, {hero.name}, rng.choice(ANIMAL_KINDS)[0])
    intro = f"{hero.his} friend {friend.name} the {friend.kind}"
  else:
    friend = _child(rng, {hero.name})
    intro = f"{hero.his} {rng.choice(('friend', 'friend', 'best friend'))} {friend.name}"
  t.cast("friend", friend)
  c["friend.intro"] = intro

  rel, call, pronoun = rng.choice(FAMILY[:4] + FAMILY[6:8] if animal else FAMILY)
  if rel in ("aunt", "uncle"):
    call = name = f"{call} {rng.choice(GIRL_NAMES if pronoun == 'she' else BOY_NAMES)}"
  else:
    name = f"{hero.his} {rel}"
  t.cast("adult", _Who(name, pronoun, rel, call))

  kind, sound = rng.choice(PETS)
  t.cast("pet", _critter(rng, {hero.name, friend.name}, kind))
  c["pet.sound"] = sound

  season = rng.choice(tuple(SEASON_WEATHER))
  c.update(season=season, weather=rng.choice(SEASON_WEATHER[season]), tod=rng.choice(TIMES),
           weekday=rng.choice(WEEKDAYS), color=rng.choice(COLORS),
           food=rng.choice(ANIMAL_FOODS if animal else FOODS))
  c["when"] = t.fill(rng.choice(_WHENS))


def generate_story(rng: random.Random) -> str:
  """One story drawn with `rng`."""
  plot, _, animal_ok = rng.choices(PLOTS, cum_weights=_CUM_WEIGHTS)[0]
  t = _Tale(rng)
  _setup(t, animal_ok and rng.random() < ANIMAL_HERO_SHARE)
  plot(t)
  return t.text()


def _rng(seed: int, index: int) -> random.Random:
  # A digest, not hash(): str hashing is salted per process.
  digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=16).digest()
  return random.Random(int.from_bytes(digest, "little"))


def story(seed: int, index: int) -> str:
  """Story number `index` of the stream for `seed`; each index is independent of the others."""
  return generate_story(_rng(seed, index))


def stories(seed: int, count: int, start: int = 0) -> Iterator[str]:
  """story(seed, i) for i in [start, start + count)."""
  for i in range(start, start + count):
    yield generate_story(_rng(seed, i))
