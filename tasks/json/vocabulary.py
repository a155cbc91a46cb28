"""The generator's builtin vocabulary: value pools, the properties generated schemas draw from (each with the kind of
value it holds), and the entities (person, order, device, event, book) that group them. The `train` and
`heldout` vocabularies keep these kinds and entities but show invented names and values (`lexicon`)."""

from __future__ import annotations

FIRST = ["Ada", "Bo", "Cleo", "Dan", "Eva", "Femi", "Gus", "Hana", "Ivan", "Jia", "Kai", "Lena", "Milo", "Nora",
         "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vik", "Wen", "Yara", "Zoe"]
LAST = ["Lopez", "Chen", "Okafor", "Smith", "Novak", "Ito", "Berg", "Costa", "Khan", "Moreau", "Rossi", "Silva",
        "Weber", "Kim", "Ali", "Dubois"]
CITIES = ["Lyon", "Oslo", "Lima", "Pune", "Cork", "Kyoto", "Porto", "Austin", "Accra", "Graz", "Quito", "Perth"]
COUNTRIES = ["France", "Norway", "Peru", "India", "Ireland", "Japan", "Portugal", "Ghana", "Austria", "Chile"]
STREETS = ["Oak St", "Mill Rd", "Park Ave", "High St", "Lake Dr", "Elm Way", "King Rd", "Bay St"]
WORDS = ["red", "blue", "green", "fast", "new", "eco", "sale", "gift", "home", "work", "kids", "sport"]
SKILLS = ["python", "sql", "design", "sales", "cooking", "driving", "french", "excel", "welding", "math"]
TITLES = ["Blue River", "Night Train", "Small Gods", "Cold Stars", "The Long Road", "Paper Moon", "Iron Bay",
          "Quiet Fire", "Open Sky", "Red Harbor"]
MODELS = ["X100", "Pixel 7", "Note 9", "T480", "Echo 2", "Zen 5", "Nova", "Orbit S"]
DOMAINS = ["mail.com", "web.io", "inbox.org", "post.net"]
POOLS: dict[str, list[str]] = {"cities": CITIES, "countries": COUNTRIES, "streets": STREETS, "words": WORDS,
                               "skills": SKILLS, "titles": TITLES, "models": MODELS}

# kind: ("person",) ("pick", pool name) ("code", prefix) ("int", lo, hi) ("num", lo, hi, decimals) ("bool",)
#       ("enum", options) ("date",) ("email",) ("list", item kind) ("obj", [properties]) ("objlist", [properties])
PROPERTIES: dict[str, tuple] = {
    "name": ("person",), "city": ("pick", "cities"), "country": ("pick", "countries"), "street": ("pick", "streets"),
    "title": ("pick", "titles"), "model": ("pick", "models"), "serial": ("code", "SN"), "sku": ("code", "A"),
    "id": ("code", "ID"),
    "age": ("int", 18, 90), "qty": ("int", 1, 20), "pages": ("int", 40, 900), "year": ("int", 1950, 2024),
    "battery": ("int", 0, 100), "seats": ("int", 10, 500), "floor": ("int", 0, 30), "score": ("int", 0, 100),
    "price": ("num", 1, 500, 2), "total": ("num", 5, 900, 2), "rating": ("num", 0, 5, 1), "lat": ("num", -90, 90, 2),
    "lon": ("num", -180, 180, 2), "temp": ("num", -20, 45, 1), "weight": ("num", 0, 60, 1),
    "active": ("bool",), "in_stock": ("bool",), "paid": ("bool",), "online": ("bool",), "verified": ("bool",),
    "status": ("enum", ["new", "paid", "sent", "done"]), "priority": ("enum", ["low", "medium", "high"]),
    "os": ("enum", ["linux", "android", "ios"]), "genre": ("enum", ["novel", "poetry", "history", "sci-fi"]),
    "role": ("enum", ["admin", "user", "guest"]), "kind": ("enum", ["talk", "meetup", "workshop", "concert"]),
    "email": ("email",), "birth_date": ("date",), "order_date": ("date",), "start_date": ("date",),
    "last_seen": ("date",), "published": ("date",),
    "tags": ("list", ("pick", "words")), "skills": ("list", ("pick", "skills")), "scores": ("list", ("int", 0, 100)),
    "authors": ("list", ("person",)),
    "address": ("obj", ["street", "city", "country"]), "location": ("obj", ["lat", "lon", "city"]),
    "customer": ("obj", ["name", "email", "address"]), "owner": ("obj", ["name", "email", "role"]),
    "venue": ("obj", ["city", "floor", "seats"]), "publisher": ("obj", ["name", "city", "year"]),
    "items": ("objlist", ["sku", "qty", "price"]), "attendees": ("objlist", ["name", "email", "age"]),
    "chapters": ("objlist", ["title", "pages"]), "readings": ("objlist", ["temp", "last_seen"]),
}
ENTITIES: dict[str, list[str]] = {
    "person": ["name", "age", "email", "birth_date", "active", "city", "skills", "address", "role", "tags"],
    "order": ["id", "status", "total", "paid", "order_date", "customer", "items", "priority", "tags"],
    "device": ["serial", "model", "os", "battery", "online", "last_seen", "location", "owner", "readings"],
    "event": ["title", "kind", "start_date", "seats", "price", "venue", "attendees", "tags", "verified"],
    "book": ["title", "authors", "year", "pages", "genre", "rating", "in_stock", "publisher", "chapters"],
}
NEEDS_DEPTH = {"list": 1, "obj": 1, "objlist": 2}  # container levels a kind needs below its object
