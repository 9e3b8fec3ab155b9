/* Must fail under UndefinedBehaviorSanitizer: proves test_c_units.py would see it. */
#include <limits.h>

volatile int big = INT_MAX;
volatile int result;

int main(void)
{
    result = big + 1;
    return 0;
}
