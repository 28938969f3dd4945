"""Twenty JSON schemas for structured-output tests: nested objects, arrays, enums, bounded
numbers, required and optional fields, formats a small model can finish within ~200 tokens
(strings carry maxLength, arrays maxItems, integers bounds: an unbounded integer lets a
small model write digits until max_tokens, which no grammar can prevent)."""

from __future__ import annotations

S = {"type": "string", "maxLength": 24}
NAME = {"type": "string", "minLength": 1, "maxLength": 20}
SMALL_INT = {"type": "integer", "minimum": -100, "maximum": 100}

SCHEMAS: dict[str, dict] = {
    "person": {"type": "object", "properties": {"name": NAME, "age": {
        "type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]},
    "city": {"type": "object", "properties": {"city": NAME, "country": NAME, "population": {
        "type": "integer", "minimum": 1}}, "required": ["city", "country", "population"]},
    "color_enum": {"type": "object", "properties": {"color": {
        "enum": ["red", "green", "blue", "yellow"]}}, "required": ["color"]},
    "boolean_flag": {"type": "object", "properties": {"done": {"type": "boolean"},
                                                      "note": S}, "required": ["done"]},
    "tags_array": {"type": "object", "properties": {"tags": {
        "type": "array", "items": NAME, "minItems": 1, "maxItems": 4}}, "required": ["tags"]},
    "number_bounds": {"type": "object", "properties": {"temperature": {
        "type": "number", "minimum": -50, "maximum": 60}, "humidity": {
        "type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["temperature", "humidity"]},
    "nested_address": {"type": "object", "properties": {"name": NAME, "address": {
        "type": "object", "properties": {"street": S, "zip": {
            "type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["street", "zip"]}},
        "required": ["name", "address"]},
    "list_of_objects": {"type": "object", "properties": {"items": {
        "type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
            "sku": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"]}}}, "required": ["items"]},
    "optional_fields": {"type": "object", "properties": {"title": NAME, "subtitle": S,
                                                         "year": {"type": "integer",
                                                                  "minimum": 1900,
                                                                  "maximum": 2100}},
                        "required": ["title"]},
    "top_level_array": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                   "maximum": 999}, "maxItems": 5},
    "string_enum_top": {"enum": ["yes", "no", "maybe"]},
    "const_version": {"type": "object", "properties": {"version": {"const": 2}, "ok": {
        "type": "boolean"}}, "required": ["version", "ok"]},
    "any_of": {"type": "object", "properties": {"id": {"anyOf": [
        {"type": "integer", "minimum": 0, "maximum": 99999}, NAME]}}, "required": ["id"]},
    "nullable": {"type": "object", "properties": {"middle_name": {"type": ["string", "null"],
                                                                  "maxLength": 16},
                                                  "last_name": NAME},
                 "required": ["middle_name", "last_name"]},
    "matrix": {"type": "object", "properties": {"rows": {"type": "array", "maxItems": 3,
                                                         "items": {"type": "array",
                                                                   "maxItems": 3,
                                                                   "items": SMALL_INT}}},
               "required": ["rows"]},
    "event": {"type": "object", "properties": {"event": NAME, "day": {
        "type": "integer", "minimum": 1, "maximum": 31}, "month": {
        "enum": ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                 "Nov", "Dec"]}}, "required": ["event", "day", "month"]},
    "product": {"type": "object", "properties": {"name": NAME, "price": {
        "type": "number", "exclusiveMinimum": 0, "maximum": 10000}, "in_stock": {
        "type": "boolean"}}, "required": ["name", "price", "in_stock"]},
    "ref_defs": {"type": "object", "$defs": {"point": {"type": "object", "properties": {
        "x": SMALL_INT, "y": SMALL_INT}, "required": ["x", "y"]}},
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"]},
    "deep_nesting": {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "object", "properties": {"c": SMALL_INT},
              "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]},
    "rating": {"type": "object", "properties": {"stars": {"type": "integer", "minimum": 1,
                                                          "maximum": 5},
                                                "review": S},
               "required": ["stars", "review"]},
}

assert len(SCHEMAS) == 20
