// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
package android.widget;

import android.content.Context;
import android.view.ViewGroup;

public class LinearLayout extends ViewGroup {
    public static final int HORIZONTAL = 0;
    public static final int VERTICAL = 1;

    public LinearLayout(Context context) {
        super(context);
        throw new UnsupportedOperationException("declaration only");
    }

    public int getOrientation() {
        throw new UnsupportedOperationException("declaration only");
    }

    public void setOrientation(int orientation) {
        throw new UnsupportedOperationException("declaration only");
    }

    public static class LayoutParams extends ViewGroup.MarginLayoutParams {
        public LayoutParams(int width, int height) {
            super(width, height);
            throw new UnsupportedOperationException("declaration only");
        }

        public LayoutParams(int width, int height, float weight) {
            super(width, height);
            throw new UnsupportedOperationException("declaration only");
        }
    }
}
