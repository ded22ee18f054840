package api

import (
	"os"
	"sort"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// TestOpenAPIInStep keeps docs/openapi.yaml in step with the handler: one
// path per method, and every $ref resolves.
func TestOpenAPIInStep(t *testing.T) {
	raw, err := os.ReadFile("../docs/openapi.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := yaml.Unmarshal(raw, &doc); err != nil {
		t.Fatalf("docs/openapi.yaml: %v", err)
	}
	h, err := New(Config{}, &fakeBackend{})
	if err != nil {
		t.Fatal(err)
	}
	var want, got []string
	for m := range h.methods {
		want = append(want, "/"+m)
	}
	for p := range doc["paths"].(map[string]any) {
		got = append(got, p)
	}
	sort.Strings(want)
	sort.Strings(got)
	if strings.Join(want, " ") != strings.Join(got, " ") {
		t.Fatalf("openapi paths %v, handler methods %v", got, want)
	}
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if ref, ok := v["$ref"].(string); ok {
				node := any(doc)
				for _, part := range strings.Split(strings.TrimPrefix(ref, "#/"), "/") {
					m, _ := node.(map[string]any)
					if node = m[part]; node == nil {
						t.Errorf("unresolved $ref %s", ref)
						return
					}
				}
			}
			for _, x := range v {
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(doc)
}
