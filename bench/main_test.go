package bench

import (
	"context"
	"os"
	"testing"

	"go.uber.org/goleak"
)

// agentEnv makes the test binary act as a bench agent, so tests can run
// agents as real child processes the way `shoal bench --agent` does.
const agentEnv = "SHOAL_BENCH_TEST_AGENT"

func TestMain(m *testing.M) {
	if os.Getenv(agentEnv) == "1" {
		if err := RunAgent(context.Background(), os.Stdin, os.Stdout); err != nil {
			os.Stderr.WriteString("agent: " + err.Error() + "\n")
			os.Exit(1)
		}
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}
