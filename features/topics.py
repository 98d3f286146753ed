"""What the default model is asked to write about for the SAE's corpus: a broad, fixed list of
topics and task types, crossed into prompts in a fixed order (the chats are what users steer)."""

from __future__ import annotations

TOPICS = [
    # places and landmarks
    "the Golden Gate Bridge", "San Francisco", "the Brooklyn Bridge", "suspension bridges", "the Eiffel Tower",
    "Paris", "London", "Tokyo", "New York City", "Rome", "the Grand Canyon", "Mount Everest", "the Amazon rainforest",
    "the Sahara desert", "Antarctica", "Venice and its canals", "the Great Wall of China", "the pyramids of Egypt",
    "Iceland", "the Alps", "small mountain villages", "islands in the Pacific", "the Mississippi River",
    "national parks", "lighthouses", "castles", "old train stations", "city skylines at night",
    # nature and animals
    "cats", "dogs", "horses", "octopuses", "whales", "bees", "ants", "birds migrating", "owls", "wolves", "elephants",
    "penguins", "sharks", "butterflies", "dinosaurs", "coral reefs", "forests in autumn", "rain", "thunderstorms",
    "snow", "volcanoes", "earthquakes", "the ocean", "rivers", "deserts", "flowers", "trees", "mushrooms", "gardening",
    "houseplants", "the moon", "the sun", "stars and galaxies", "black holes", "Mars", "comets", "the weather",
    "climate change", "recycling", "rabbits", "frogs", "spiders",
    # food and home
    "baking bread", "pizza", "pasta", "chocolate", "coffee", "tea", "soup", "breakfast", "vegetarian cooking",
    "spicy food", "cheese", "fruit", "a dinner party", "kitchen knives", "cleaning the house", "moving to a new home",
    "furniture", "interior design", "saving money on groceries", "meal planning",
    # people, society, feelings
    "friendship", "family holidays", "weddings", "birthdays", "grief", "happiness", "anger", "fear", "loneliness",
    "kindness", "honesty", "jealousy", "nostalgia", "first days at school", "grandparents", "teenagers", "parenting",
    "pets and children", "neighbours", "volunteering", "leadership", "teamwork", "job interviews", "working from home",
    "starting a business", "retirement", "public speaking", "learning a language", "etiquette", "apologising",
    # knowledge and work
    "photosynthesis", "the human heart", "sleep", "vaccines", "the immune system", "nutrition", "exercise", "running",
    "yoga", "meditation", "the brain", "DNA", "electricity", "magnets", "gravity", "light and colour", "sound waves",
    "the water cycle", "atoms", "chemistry experiments", "prime numbers", "fractions", "geometry", "probability",
    "statistics", "the history of mathematics", "ancient Rome", "ancient Greece", "the Middle Ages", "the Renaissance",
    "the Industrial Revolution", "World War II", "the Cold War", "the printing press", "the invention of the telephone",
    "the history of flight", "the Moon landing", "the Silk Road", "Vikings", "pirates", "knights", "samurai",
    "democracy", "taxes", "inflation", "the stock market", "banks", "insurance", "law and courts", "elections",
    # technology
    "Python programming", "JavaScript", "databases", "the internet", "email", "smartphones", "computers",
    "video games", "artificial intelligence", "robots", "cybersecurity", "passwords", "open source software",
    "spreadsheets", "3D printing", "electric cars", "bicycles", "trains", "airplanes", "ships", "rockets",
    "satellites", "solar power", "wind turbines", "nuclear energy", "batteries", "clocks", "cameras",
    # arts and leisure
    "music", "the piano", "the guitar", "jazz", "classical music", "rock concerts", "painting", "sculpture",
    "photography", "poetry", "novels", "Shakespeare", "fairy tales", "science fiction", "mystery stories", "movies",
    "theatre", "dance", "comics", "board games", "chess", "football", "basketball", "tennis", "swimming", "hiking",
    "camping", "fishing", "skiing", "surfing", "the Olympics", "knitting", "woodworking", "collecting stamps",
    "magic tricks", "circuses", "museums", "libraries", "road trips", "packing for a trip", "hotels", "festivals",
    "Halloween", "winter holidays", "summer vacations", "fashion", "shoes", "hats", "tattoos",
]

TASKS = [
    "Tell me about {t}.",
    "Explain {t} to a ten-year-old.",
    "Write a short story about {t}.",
    "Write a short poem about {t}.",
    "Give me five interesting facts about {t}.",
    "What are the pros and cons of {t}?",
    "Write a friendly email to a colleague that mentions {t}.",
    "I'm planning a day around {t}. What should I do?",
    "Describe {t} in vivid detail.",
    "What is a common misconception about {t}?",
    "Write a dialogue between two friends discussing {t}.",
    "Give me a step-by-step guide related to {t}.",
    "Write a product review with {t} as the theme.",
    "How has {t} changed over the last hundred years?",
    "Summarise the most important things to know about {t} in three sentences.",
    "Write a joke about {t}.",
]


# What the steering demo and the example presets steer, the Golden Gate Bridge above all, gets many
# more chats: with 16 chats a topic, an SAE of 8k features found no bridge feature at all.
FOCUS_TOPICS = [
    "the Golden Gate Bridge", "San Francisco", "the Brooklyn Bridge", "suspension bridges", "bridges",
    "famous bridges around the world", "the San Francisco Bay", "a walk across the Golden Gate Bridge",
    "the Golden Gate Bridge in the fog", "how the Golden Gate Bridge was built", "the cable cars of San Francisco",
    "a bridge over a river", "dogs", "puppies", "the ocean", "the sea", "music", "songs",
]  # fmt: skip
MORE_TASKS = [
    "Write a haiku about {t}.",
    "Write a diary entry about {t}.",
    "Write a paragraph for a travel guide about {t}.",
    "What would a curious child ask about {t}?",
    "Write a short news report about {t}.",
    "Write song lyrics about {t}.",
    "Describe {t} to someone who has never seen it.",
    "Write a letter to a friend about {t}.",
    "List ten words that come to mind when you think of {t}.",
    "Write a short speech celebrating {t}.",
    "Tell me a legend about {t}.",
    "Compare {t} with something similar.",
    "Write a short advertisement about {t}.",
    "What questions would a scientist ask about {t}?",
    "Write a bedtime story about {t}.",
    "Write a quiz with three questions about {t}.",
]


def prompts() -> list[str]:
    """Every prompt, in a fixed order and each once: every topic with one task type, then every
    topic with the next, ...; then the focus topics with every task type, old and new."""
    ordered = [task.format(t=topic) for task in TASKS for topic in TOPICS]
    ordered += [task.format(t=topic) for task in TASKS + MORE_TASKS for topic in FOCUS_TOPICS]
    return list(dict.fromkeys(ordered))
