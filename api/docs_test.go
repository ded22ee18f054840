package api

import (
	"os"
	"regexp"
	"testing"
)

// TestDocExamples sends every curl example body in docs/api.md to the
// handler: each must be a well-formed request (no 4xx from the API's own
// checks), so the docs cannot drift from the code.
func TestDocExamples(t *testing.T) {
	raw, err := os.ReadFile("../docs/api.md")
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`-d '([^']*)' \$API/(\w+)`)
	found := re.FindAllStringSubmatch(string(raw), -1)
	if len(found) < 12 {
		t.Fatalf("found %d curl examples in docs/api.md; the regexp is stale", len(found))
	}
	s := newTestServer(t, testKey, nil)
	s.fake.history = []Publication{{Offset: 42, Data: []byte(`1`)}}
	for _, m := range found {
		body, method := m[1], m[2]
		st, ans := s.call(t, method, body)
		if c, _ := errCode(ans); st >= 400 && st < 500 && c != CodeUnrecoverablePosition {
			t.Errorf("docs example %s %s: %d %v", method, body, st, ans)
		}
	}
}
