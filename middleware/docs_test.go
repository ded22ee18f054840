package middleware

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/shoalhq/shoal/configs"
)

// TestDocExamples compiles every full `middleware:` example of
// docs/middleware.md, so the page cannot show a config Shoal refuses.
func TestDocExamples(t *testing.T) {
	raw, err := os.ReadFile("../docs/middleware.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks := regexp.MustCompile("(?s)```yaml\n(.*?)```").FindAllStringSubmatch(string(raw), -1)
	n := 0
	for _, b := range blocks {
		y := b[1]
		if !strings.HasPrefix(y, "middleware:") || strings.Contains(y, "plugin:") { // a plugin needs its binary
			continue
		}
		n++
		if _, err := configs.Load([]byte(y), "docs/middleware.md"); err != nil {
			t.Errorf("example refused:\n%s\n%v", y, err)
		}
	}
	if n < 3 {
		t.Fatalf("found %d middleware examples; the regexp is stale", n)
	}
}
